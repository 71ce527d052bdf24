"""`lorakit generate`: images from prompt lines in batches, with networks, img2img, inpainting and highres fix.

The model loads through its family (`load_model`), the networks are merged (`--network_merge`) or attached
unmerged so each prompt's `--am` multipliers apply, and every image comes from the family's own diffusers
pipeline over these modules (`pipeline`, `task_pipeline` for img2img and inpainting) with one CPU generator per
image, so an image depends on its seed alone, not on its batch. Weighted and long prompts are encoded by the
family (`prompt_embedding_kwargs`). ControlNets (`gen_control.py`) load through the family's `controlnet`, and
their batches come from its ControlNet pipelines. Each PNG carries gen_img.py's text chunks (prompt, seed, sampler, steps,
scale, negative prompt, ...). Everything is checked before the model loads.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lorakit.atomic import staged_file
from lorakit.errors import ConfigError
from lorakit.families.base import ModelFamily, ModelSource
from lorakit.families.common.prompt_weighting import plain_text
from lorakit.sampling import gen_control, gen_jobs
from lorakit.sampling.apply_lora import LoraFile, LoraMerger, check_family, parse_lora_spec, read_lora_file
from lorakit.sampling.minimal import (
    SampleOptions, _device_and_dtypes, _place, offload_models, sampler_problem, text_mask_problems,
)

log = logging.getLogger("lorakit")


@dataclass
class GenerateOptions:
    """What `lorakit generate` was asked for (cli/generate.py has the option names)."""

    model: str
    outdir: str = "outputs"
    family: str = "auto"
    v2: bool = False
    v_parameterization: bool = False
    model_files: dict[str, str] = field(default_factory=dict)
    prompt: str | None = None
    from_file: str | None = None
    negative_prompt: str = ""
    images_per_prompt: int = 1
    n_iter: int = 1
    batch_size: int = 1
    seed: int | None = None
    iter_same_seed: bool = False
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    scale: float | None = None
    guidance: float | None = None
    negative_scale: float | None = None
    sampler: str | None = None
    clip_skip: int | None = None
    max_embeddings_multiples: int | None = None
    networks: list[str] = field(default_factory=list)  # "path;multiplier"
    embeddings: list[str] = field(default_factory=list)  # textual-inversion files; the token is the file's stem
    network_merge: bool = False
    image_path: str | None = None
    mask_path: str | None = None
    strength: float | None = None
    highres_fix_scale: float | None = None
    highres_fix_steps: int = 28
    highres_fix_strength: float | None = None
    highres_fix_save_1st: bool = False
    highres_fix_latents_upscaling: bool = False
    highres_fix_disable_control_net: bool = False
    control_net_models: list[str] = field(default_factory=list)
    control_net_lllite_models: list[str] = field(default_factory=list)
    control_net_multipliers: list[float] = field(default_factory=list)
    control_net_ratios: list[float] = field(default_factory=list)
    control_net_preps: list[str] = field(default_factory=list)
    guide_image_path: list[str] = field(default_factory=list)
    sequential_file_name: bool = False
    text_masks: frozenset[str] = frozenset()  # --apply_t5_attn_mask / --apply_lg_attn_mask
    dtype: str | None = None
    denoiser_dtype: str | None = None
    device: str | None = None
    offload: bool = False
    problems: list[str] = field(default_factory=list)  # found by the command line, reported with the others


@dataclass
class Plan:
    family: ModelFamily
    loras: list[LoraFile]
    jobs: list[gen_jobs.ImageJob]
    device: torch.device
    dtype: torch.dtype
    denoiser_dtype: Any
    embedded_guidance: bool = False
    control: gen_control.ControlPlan | None = None


def run_generate(options: GenerateOptions) -> list[Path]:
    plan = check(options)
    comps = plan.family.load_model(ModelSource(
        options.model, dict(options.model_files), torch.bfloat16 if plan.denoiser_dtype == "fp8" else plan.dtype,
        v2=options.v2, v_parameterization=options.v_parameterization, fp8="denoiser" if plan.denoiser_dtype == "fp8" else None))
    merger = LoraMerger(plan.family, comps)
    if options.network_merge:
        for lora in plan.loras:
            log.info("merged %s x%g into %d layers", lora.spec.path, lora.spec.multiplier, merger.merge(lora))
    _place(comps, _PlaceAt(plan.device if not options.offload else torch.device("cpu"), plan.dtype, plan.denoiser_dtype))
    _load_embeddings(plan.family, comps, options.embeddings)
    networks = [] if options.network_merge else [merger.attach(lora) for lora in plan.loras]
    controls = gen_control.load_controls(plan.control, comps, plan.device, plan.dtype) if plan.control else []
    return Generator(options, plan, comps, networks, controls).run()


def _load_embeddings(family: ModelFamily, comps: Any, files: list[str]) -> None:
    """--textual_inversion_embeddings: each file's vectors under its file name, as gen_img.py names them."""
    from lorakit.adapters.formats import load_lora_file

    for file in files:
        state, _ = load_lora_file(file)
        family.load_embedding(comps, state, Path(file).stem, file)
        log.info("textual inversion: %s as %r", file, Path(file).stem)


@dataclass
class _PlaceAt:
    device: torch.device
    dtype: torch.dtype
    denoiser_dtype: Any


# ---------------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------------


def check(options: GenerateOptions) -> Plan:
    """Every problem at once, then the networks and the prompts read; nothing large is loaded."""
    from lorakit.families.registry import detect_family, get_family

    problems = list(options.problems)
    if not Path(options.model).exists():
        raise ConfigError([*problems, f"--ckpt {options.model}: model file or folder not found"])
    family = get_family(options.family if options.family != "auto" else detect_family(options.model))
    problems += [f"--{n} {p}: file not found" for n, p in options.model_files.items() if not Path(p).exists()]
    problems += [f"--{n}: {family.title} models take no such file" for n in options.model_files if n not in family.part_files]
    if (options.prompt is None) == (options.from_file is None):
        problems.append("give one of --prompt and --from_file")
    elif options.from_file and not Path(options.from_file).is_file():
        problems.append(f"--from_file {options.from_file}: file not found")
    problems += _task_problems(options, family)
    problems += text_mask_problems(options.text_masks, family)
    if options.sampler:
        problems += [p for p in [sampler_problem(options.sampler, f"--sampler {options.sampler}")] if p]
    if options.negative_scale is not None:
        problems.append("--negative_scale: not available (the pipelines guide with one negative prompt and --scale)")
    device, dtype, denoiser_dtype = _device_and_dtypes(_as_sample(options), problems)
    control = gen_control.control_plan(options, family, problems)
    specs = []
    for text in options.networks:
        try:
            specs.append(parse_lora_spec(text, "--network_weights"))
        except ConfigError as exc:
            problems += exc.problems
    problems += [f"--network_weights {s.path}: file not found" for s in specs if not Path(s.path).is_file()]
    problems += [f"--textual_inversion_embeddings {f}: file not found" for f in options.embeddings if not Path(f).is_file()]
    if options.embeddings and type(family).load_embedding is ModelFamily.load_embedding:
        problems.append(f"--textual_inversion_embeddings: {family.title} models take no textual-inversion embeddings")
    prompts, defaults = _prompts(options, family, problems)
    if control is not None or not (options.control_net_models or options.control_net_lllite_models):
        problems += gen_control.line_problems(control, prompts)  # the lines' --cn with the options' files
    if problems:
        raise ConfigError(problems)
    loras = [read_lora_file(spec, "--network_weights") for spec in specs]
    for lora in loras:
        check_family(lora, family.name)
    jobs = _jobs(options, prompts, defaults, loras, control)
    return Plan(family, loras, jobs, device, dtype, denoiser_dtype, control=control)


def _as_sample(options: GenerateOptions) -> SampleOptions:
    return SampleOptions(model=options.model, dtype=options.dtype, denoiser_dtype=options.denoiser_dtype, device=options.device)


def _task_problems(options: GenerateOptions, family: ModelFamily) -> list[str]:
    problems = []
    if options.image_path and "img2img" not in family.image_tasks:
        problems.append(f"--image_path: img2img is not available for {family.title} models")
    if options.mask_path and "inpaint" not in family.image_tasks:
        problems.append(f"--mask_path: inpainting is not available for {family.title} models")
    if options.mask_path and not options.image_path:
        problems.append("--mask_path needs --image_path (the image to inpaint)")
    if options.highres_fix_scale is not None and "img2img" not in family.image_tasks:
        problems.append(f"--highres_fix_scale: highres fix needs img2img, which {family.title} models do not have")
    if options.highres_fix_scale is not None and not 0 < options.highres_fix_scale < 1:
        problems.append(f"--highres_fix_scale {options.highres_fix_scale}: the first pass's size factor, between 0 and 1")
    for name in ("strength", "highres_fix_strength"):
        value = getattr(options, name)
        if value is not None and not 0 < value <= 1:
            problems.append(f"--{name} {value}: must be in (0, 1]")
    for name in ("image_path", "mask_path"):
        if getattr(options, name) and not Path(getattr(options, name)).exists():
            problems.append(f"--{name} {getattr(options, name)}: file or folder not found")
    return problems


def _prompts(options: GenerateOptions, family: ModelFamily, problems: list[str]
             ) -> tuple[list[gen_jobs.PromptSettings], gen_jobs.LineDefaults]:
    """The prompt lines read (none while the prompt source itself is a problem)."""
    size = family.inference_resolution(ModelSource(options.model, v2=options.v2, v_parameterization=options.v_parameterization))
    defaults = gen_jobs.LineDefaults(
        width=options.width or size, height=options.height or size, steps=options.steps or family.inference.steps,
        scale=options.scale, guidance=options.guidance,
        negative_prompt=options.negative_prompt, strength=options.strength, sampler=options.sampler,
    )
    if (options.prompt is None) == (options.from_file is None) or (options.from_file and not Path(options.from_file).is_file()):
        return [], defaults  # already a problem
    prompts = []
    try:
        for line, where in gen_jobs.read_lines(options.prompt, options.from_file):
            try:
                prompts.append(gen_jobs.parse_line(line, defaults, where))
            except ConfigError as exc:
                problems += exc.problems
    except ConfigError as exc:
        problems += exc.problems
    return prompts, defaults


def _jobs(options: GenerateOptions, prompts: list[gen_jobs.PromptSettings], defaults: gen_jobs.LineDefaults,
          loras: list[LoraFile], control: gen_control.ControlPlan | None) -> list[gen_jobs.ImageJob]:
    problems = []
    for p in prompts:
        if p.sampler and (problem := sampler_problem(p.sampler, f"{p.where}: --ss")):
            problems.append(problem)
        if p.network_muls and len(p.network_muls) > len(loras):
            problems.append(f"{p.where}: --am gives {len(p.network_muls)} multipliers for {len(loras)} networks")
        if p.network_muls and options.network_merge:
            problems.append(f"{p.where}: --am cannot change merged networks (leave out --network_merge)")
        if p.negative_scale is not None:
            problems.append(f"{p.where}: --nl (negative scale) is not available")
    if defaults.unused:
        log.warning("prompt options without effect here: %s", ", ".join(f"--{f}" for f in sorted(defaults.unused)))
    if problems:
        raise ConfigError(problems)
    jobs = gen_jobs.image_jobs(prompts, images_per_prompt=options.images_per_prompt, n_iter=options.n_iter, seed=options.seed,
                               iter_same_seed=options.iter_same_seed,
                               init_images=gen_jobs.image_files(options.image_path, "--image_path"),
                               mask_images=gen_jobs.image_files(options.mask_path, "--mask_path"))
    return [replace(job, control_images=gen_control.job_control_images(control, job.settings, index))
            for index, job in enumerate(jobs)]


# ---------------------------------------------------------------------------------------------------------
# generating
# ---------------------------------------------------------------------------------------------------------


class Generator:
    """Runs the batches: one pipeline per (task, sampler), kept for the run."""

    def __init__(self, options: GenerateOptions, plan: Plan, comps: Any, networks: list[Any], controls: list[Any]):
        self.options, self.plan, self.comps, self.networks = options, plan, comps, networks
        self.family, self.controls = plan.family, controls
        self.pipelines: dict[tuple[str, str | None, bool], Any] = {}
        self.outdir = Path(options.outdir)
        self.stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
        self.written: list[Path] = []

    def run(self) -> list[Path]:
        # masked prompts are encoded one image at a time (their lengths differ); an image depends on its seed alone
        groups = gen_jobs.batches(self.plan.jobs, 1 if self.options.text_masks else self.options.batch_size)
        for index, batch in enumerate(groups, start=1):
            log.info("batch %d/%d: %d image(s) at %dx%d", index, len(groups), len(batch), batch[0].settings.width, batch[0].settings.height)
            self._set_multipliers(batch[0].settings)
            images = self._batch(batch)
            for job, image in zip(batch, images):
                self._save(job, image)
        return self.written

    def _set_multipliers(self, settings: gen_jobs.PromptSettings) -> None:
        muls = list(settings.network_muls or ())
        while muls and len(muls) < len(self.networks):
            muls.append(muls[-1])  # gen_img.py repeats the last value
        for network, lora, mul in zip(self.networks, self.plan.loras, muls or [None] * len(self.networks)):
            network.set_multiplier(lora.spec.multiplier if mul is None else mul)

    def _batch(self, batch: list[gen_jobs.ImageJob]) -> list[Image.Image]:
        settings = batch[0].settings
        if self.options.highres_fix_scale is None:
            return self._call(batch, settings.width, settings.height, settings.steps, [j.seed for j in batch],
                              init=_init_images(batch, settings), masks=_masks(batch, settings), strength=settings.strength)
        return self._highres(batch, settings)

    def _highres(self, batch: list[gen_jobs.ImageJob], settings: gen_jobs.PromptSettings) -> list[Image.Image]:
        """gen_img.py's highres fix: a first pass at --highres_fix_scale of the size with --highres_fix_steps,
        upscaled (LANCZOS, or the latents bicubically) and refined by img2img at the full size with the image's
        steps and strength (default 0.8) from seed + 1."""
        scale = self.options.highres_fix_scale
        width, height = (int(v * scale + 0.5) // 8 * 8 for v in (settings.width, settings.height))
        latents = self.options.highres_fix_latents_upscaling
        first = self._call(batch, width, height, self.options.highres_fix_steps, [j.seed for j in batch],
                           init=_init_images(batch, settings, (width, height)), masks=_masks(batch, settings, (width, height)),
                           strength=self.options.highres_fix_strength or settings.strength, output="latent" if latents else "pil")
        if self.options.highres_fix_save_1st and not latents:
            for job, image in zip(batch, first):
                self._save(job, image, prefix="0")
        if latents:
            upscaled = torch.nn.functional.interpolate(first.float(), (settings.height // 8, settings.width // 8), mode="bicubic").to(first.dtype)
        else:
            upscaled = [image.resize((settings.width, settings.height), resample=Image.LANCZOS) for image in first]
        return self._call(batch, settings.width, settings.height, settings.steps, [j.seed + 1 for j in batch],
                          init=upscaled, masks=None, strength=settings.strength or 0.8,
                          controlled=not self.options.highres_fix_disable_control_net)

    def _call(self, batch, width, height, steps, seeds, *, init, masks, strength, output: str = "pil", controlled=True):
        settings = batch[0].settings
        task = "inpaint" if masks is not None else ("img2img" if init is not None else "text")
        controlled = controlled and bool(self.controls)
        pipe = self._pipeline(task, settings.sampler, controlled)
        kwargs = self._prompt_kwargs(pipe, batch)
        accepted = getattr(pipe, "accepted_inputs", None) or inspect.signature(pipe.__call__).parameters
        kwargs.update(self._guidance(settings, "true_cfg_scale" in accepted))
        strength = strength if strength is not None else 0.8
        if task != "text":
            kwargs.update(image=init, strength=strength)
        if controlled:  # gen_img.py's ratio counts the steps the pipeline denoises (fewer for img2img)
            denoising = steps if task == "text" else min(int(steps * strength), steps)
            kwargs.update(gen_control.control_inputs(self.plan.control, task, batch, width, height, denoising))
        if masks is not None:
            kwargs["mask_image"] = masks
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        out = pipe(**kwargs, num_inference_steps=steps, width=width, height=height, generator=generators, output_type=output)
        return out.images

    def _guidance(self, settings: gen_jobs.PromptSettings, embedded: bool) -> dict[str, float]:
        """A guidance-distilled model (its pipeline takes `true_cfg_scale`): --guidance is embedded (default the
        family's) and --scale is true CFG (default 1: none), as flux_minimal_inference.py; else --scale is CFG."""
        default = self.family.inference.guidance_scale
        if embedded:
            return {"guidance_scale": default if settings.guidance is None else settings.guidance,
                    "true_cfg_scale": 1.0 if settings.scale is None else settings.scale}
        return {"guidance_scale": default if settings.scale is None else settings.scale}

    def _pipeline(self, task: str, sampler: str | None, controlled: bool) -> Any:
        name = (sampler or "").lower() or None
        key = (task, name, controlled)
        if key not in self.pipelines:
            if controlled:
                pipe = self.plan.control.control.pipeline(self.comps, self.controls, name, task)
            elif task == "text":
                pipe = self.family.pipeline(self.comps, name)
            else:
                pipe = self.family.task_pipeline(self.comps, task, name)
            if self.options.offload:
                offload_models(pipe, self.plan.device)
            pipe.set_progress_bar_config(desc=f"{task} ({type(pipe.scheduler).__name__})", leave=False)
            self.pipelines[key] = pipe
        return self.pipelines[key]

    def _prompt_kwargs(self, pipe: Any, batch: list[gen_jobs.ImageJob]) -> dict[str, Any]:
        prompts = [j.settings.prompt for j in batch]
        negatives = [j.settings.negative_prompt for j in batch]
        if self.options.text_masks:  # one image per batch (`run`)
            return self.family.masked_prompt_inputs(self.comps, plain_text(prompts[0]), plain_text(negatives[0]),
                                                    self.options.text_masks)
        embeds = self.family.prompt_embedding_kwargs(pipe, prompts, negatives,
                                                     max_embeddings_multiples=self.options.max_embeddings_multiples or 1,
                                                     clip_skip=self.options.clip_skip)
        if embeds is not None:
            return embeds
        return {"prompt": [plain_text(p) for p in prompts], "negative_prompt": [plain_text(n) for n in negatives]}

    def _save(self, job: gen_jobs.ImageJob, image: Image.Image, prefix: str = "") -> None:
        highres = ("1" if not prefix else prefix) if self.options.highres_fix_scale is not None else ""
        if job.settings.filename and not prefix:
            name = gen_jobs.safe_file_name(job.settings.filename)
            if self.outdir / name in self.written:  # a line's later images: NAME_<image number>.png
                name = f"{Path(name).stem}_{job.number:03d}.png"
        elif self.options.sequential_file_name:
            name = f"im_{highres}{job.number:06d}.png"
        else:
            name = f"im_{self.stamp}_{highres}{job.number - 1:03d}_{job.seed}.png"
        target = self.outdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with staged_file(target) as tmp:
            scale = next(iter(self._guidance(job.settings, False).values()))
            image.save(tmp, format="PNG", pnginfo=png_text(job, self._sampler_name(job), scale))
        self.written.append(target)

    def _sampler_name(self, job: gen_jobs.ImageJob) -> str:
        return (job.settings.sampler or self.options.sampler or "ddim").lower()


def png_text(job: gen_jobs.ImageJob, sampler: str, scale: float) -> PngInfo:
    """The text chunks gen_img.py writes (its names and order)."""
    s = job.settings
    info = PngInfo()
    info.add_text("prompt", s.prompt)
    info.add_text("seed", str(job.seed))
    info.add_text("sampler", sampler)
    info.add_text("steps", str(s.steps))
    info.add_text("scale", str(scale))
    if s.negative_prompt:
        info.add_text("negative-prompt", s.negative_prompt)
    if s.clip_prompt is not None:
        info.add_text("clip-prompt", s.clip_prompt)
    info.add_text("raw-prompt", s.raw)
    return info


def _init_images(batch, settings, size=None):
    if batch[0].init_image is None:
        return None
    return [_open(job.init_image, size or (settings.width, settings.height)) for job in batch]


def _masks(batch, settings, size=None):
    if batch[0].mask_image is None:
        return None
    return [_open(job.mask_image, size or (settings.width, settings.height), "L") for job in batch]


def _open(path: str, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    with Image.open(path) as image:
        image = image.convert(mode)
        return image if image.size == size else image.resize(size, resample=Image.LANCZOS)
