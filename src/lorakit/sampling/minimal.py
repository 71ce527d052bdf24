"""`lorakit sample`: images from a base model with LoRAs merged, for every family (sd-scripts' minimal inference).

The model loads the way training loads it (family detected by `families/registry.py`), the LoRAs are merged into
its weights (`apply_lora.py`), and the images come from the family's own pipeline through `generate_sample`, the
code that makes training's sample images. Every option, prompt, sampler and LoRA file is checked before the
model loads; an image is written to a temporary name and renamed, so a failed run leaves no file behind.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lorakit.atomic import staged_file
from lorakit.errors import ConfigError
from lorakit.families.base import ModelFamily, ModelSource
from lorakit.sampling.apply_lora import LoraFile, LoraMerger, check_family, parse_lora_spec, read_lora_file
from lorakit.sampling.prompts import SampleDefaults, SamplePrompt
from lorakit.tools.targets import forwards_restored

log = logging.getLogger("lorakit")

DTYPES = {"fp32": torch.float32, "float": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
MODEL_FILE_OPTIONS = ("vae", "clip_l", "clip_g", "t5xxl", "ae")  # the command's options naming part files


@dataclass
class SampleOptions:
    """What `lorakit sample` was asked for (see cli/sample.py for the option names)."""

    model: str
    loras: list[str] = field(default_factory=list)
    prompt: str | None = None
    negative_prompt: str = ""
    prompt_file: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    sampler: str | None = None
    clip_skip: int | None = None
    output: str = "."
    dtype: str | None = None
    denoiser_dtype: str | None = None
    device: str | None = None
    family: str = "auto"
    v2: bool = False
    v_parameterization: bool = False
    model_files: dict[str, str] = field(default_factory=dict)  # the parts in files of their own (vae, t5xxl, ...)
    offload: bool = False  # each model on the device only while it runs
    apply_t5_attn_mask: bool = False
    apply_lg_attn_mask: bool = False

    @property
    def text_masks(self) -> frozenset[str]:
        return frozenset(n for n in ("apply_t5_attn_mask", "apply_lg_attn_mask") if getattr(self, n))


@dataclass
class Plan:
    """Everything checked before the model loads."""

    loras: list[LoraFile]
    device: torch.device
    dtype: torch.dtype
    denoiser_dtype: torch.dtype | str | None


def run_sample(options: SampleOptions) -> list[Path]:
    """Check everything, load the model, merge the LoRAs, write one PNG per prompt; returns the files written."""
    plan = check_options(options)
    family = _family(options)
    source = _model_source(options, plan, family)
    for lora in plan.loras:
        check_family(lora, family.name)
    _check_text_masks(options, family)
    prompts = _prompts(options, family, source)  # the prompt file is read before the model loads
    targets = _output_paths(options.output, prompts)
    comps = family.load_model(source)
    merger = LoraMerger(family, comps)
    # the weights are merged; the layer views merging needed leave nothing behind on the model's forwards
    with forwards_restored([comps.denoiser, *(e for e in comps.text_encoders if e is not None)]):
        for lora in plan.loras:
            layers = merger.merge(lora)
            log.info("merged %s x%g into %d layers", lora.spec.path, lora.spec.multiplier, layers)
    _place(comps, replace(plan, device=torch.device("cpu")) if options.offload else plan)
    return _generate(family, comps, prompts, targets, options, plan.device)


# ---------------------------------------------------------------------------------------------------------
# checks (no model loaded yet)
# ---------------------------------------------------------------------------------------------------------


def check_options(options: SampleOptions) -> Plan:
    """Every problem with the options at once, then the LoRA files read (each refusal names its file)."""
    problems: list[str] = []
    if not Path(options.model).exists():
        problems.append(f"--ckpt_path {options.model}: model file or folder not found")
    for name, path in options.model_files.items():
        if not Path(path).exists():
            problems.append(f"--{name} {path}: file not found")
    if not options.prompt and not options.prompt_file:
        problems.append("--prompt or --prompt_file is needed")
    if options.prompt and options.prompt_file:
        problems.append("--prompt and --prompt_file: give one of them")
    if options.prompt_file:
        problems += _prompt_file_problems(options.prompt_file)
    for name in ("width", "height"):
        value = getattr(options, name)
        if value is not None and (value < 64 or value % 8):
            problems.append(f"--{name} {value}: must be a multiple of 8, at least 64")
    if options.steps is not None and not 1 <= options.steps <= 1000:
        problems.append(f"--steps {options.steps}: must be between 1 and 1000")
    if options.sampler:
        problems += [p for p in [sampler_problem(options.sampler, f"--sampler {options.sampler}")] if p]
    problems += _output_problems(options.output)
    specs = []
    for text in options.loras:
        try:
            specs.append(parse_lora_spec(text))
        except ConfigError as exc:
            problems += exc.problems
    problems += [f"--lora {s.path}: file not found" for s in specs if not Path(s.path).is_file()]
    device, dtype, denoiser_dtype = _device_and_dtypes(options, problems)
    if problems:
        raise ConfigError(problems)
    return Plan([read_lora_file(spec) for spec in specs], device, dtype, denoiser_dtype)


def sampler_problem(name: str, where: str) -> str | None:
    """Unknown names are an error here (training falls back to DDIM as sd-scripts does, a one-off run should not)."""
    from lorakit.objectives.samplers import SAMPLERS, build_sampler

    if name.lower() not in SAMPLERS:
        return f"{where}: unknown sampler (known: {', '.join(SAMPLERS)})"
    try:
        build_sampler(name, "epsilon")
    except (ImportError, ValueError) as exc:
        return f"{where}: sampler {name} cannot be used here ({' '.join(str(exc).split())})"
    return None


def _prompt_file_problems(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        return [f"--prompt_file {path}: file not found"]
    if file.suffix.lower() not in (".txt", ".toml", ".json"):
        return [f"--prompt_file {path}: the file must end in .txt, .toml or .json"]
    return []


def _output_problems(output: str) -> list[str]:
    path = Path(output)
    if path.suffix and path.suffix.lower() != ".png" and not path.is_dir():
        return [f"--output {output}: images are written as PNG; give a .png file or a folder"]
    if path.suffix.lower() == ".png" and path.is_dir():
        return [f"--output {output}: is a folder; give a file name or the folder without .png"]
    return []


def _device_and_dtypes(options: SampleOptions, problems: list[str]) -> tuple[torch.device, torch.dtype, Any]:
    device_name = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device_name)
    except RuntimeError:
        problems.append(f"--device {device_name}: not a device name (cpu, cuda, cuda:1, mps)")
        device = torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        problems.append(f"--device {device_name}: CUDA is not available on this machine")
    default = "bf16" if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cuda" and default == "fp32":
        default = "fp16"
    dtype_name = (options.dtype or default).lower()
    if dtype_name not in DTYPES:
        problems.append(f"--dtype {options.dtype}: expected one of {', '.join(DTYPES)}")
    denoiser: Any = None
    if options.denoiser_dtype:
        name = options.denoiser_dtype.lower()
        if name == "fp8":
            denoiser = "fp8"
        elif name in DTYPES:
            denoiser = DTYPES[name]
        else:
            problems.append(f"--flux_dtype {options.denoiser_dtype}: expected fp8 or one of {', '.join(DTYPES)}")
    return device, DTYPES.get(dtype_name, torch.float32), denoiser


def _check_text_masks(options: SampleOptions, family: ModelFamily) -> None:
    problems = text_mask_problems(options.text_masks, family)
    if problems:
        raise ConfigError(problems)


def text_mask_problems(masks: frozenset[str], family: ModelFamily) -> list[str]:
    """The `--apply_*_attn_mask` options this family's sampling does not have."""
    from lorakit.families.registry import all_families

    problems = []
    for name in sorted(masks - set(family.text_mask_options)):
        takers = ", ".join(f.title for f in all_families() if name in f.text_mask_options) or "none"
        problems.append(f"--{name}: {family.title} models have no such text attention mask (models that have: {takers})")
    return problems


def _family(options: SampleOptions) -> ModelFamily:
    """--family, or the family detected from the model's header (as training detects it)."""
    from lorakit.families.registry import detect_family, get_family

    return get_family(options.family if options.family != "auto" else detect_family(options.model))


def _model_source(options: SampleOptions, plan: Plan, family: ModelFamily) -> ModelSource:
    """The model as `lorakit train` loads it: built in the sampling dtype directly (a LoRA merged into bf16
    weights in float32 arithmetic is rounded once, as a merge into float32 weights cast afterwards is), never as
    a float32 copy of the whole model first.

    With fp8, families that store float8 weights as they load (before their fused q/k/v views are made) do so
    for the denoiser (training's `--fp8_base_unet`) and the LoRAs merge into those weights, computing in bf16;
    the others are stored in float8 after merging (`_place`)."""
    unknown = [f"--{name}" for name in options.model_files if name not in family.part_files]
    if unknown:
        taken = ", ".join(f"--{name}" for name in family.part_files) or "no part files"
        raise ConfigError([f"{option}: {family.title} models take no such file (they take {taken})" for option in unknown])
    fp8 = plan.denoiser_dtype == "fp8"
    dtype = torch.bfloat16 if fp8 else plan.dtype
    if dtype == torch.float16 and not torch.cuda.is_available():
        dtype = torch.float32  # fp16 needs a CUDA GPU, as in training
    return ModelSource(options.model, dict(options.model_files), dtype, v2=options.v2,
                       v_parameterization=options.v_parameterization, fp8="denoiser" if fp8 else None)


# ---------------------------------------------------------------------------------------------------------
# prompts and outputs
# ---------------------------------------------------------------------------------------------------------


def _prompts(options: SampleOptions, family: ModelFamily, source: ModelSource) -> list[SamplePrompt]:
    """The prompts with every value filled in: the command line's, or a prompt file's lines over them (the
    family's own defaults where neither gives one: sd-scripts' sample steps, each model's guidance and size)."""
    from lorakit.sampling.prompts import read_sample_prompts

    size = family.inference_resolution(source)
    defaults = SampleDefaults(
        width=options.width or size, height=options.height or size, sample_steps=options.steps or family.inference.steps,
        scale=family.inference.guidance_scale if options.guidance_scale is None else options.guidance_scale,
    )
    if options.prompt_file:
        prompts = read_sample_prompts(options.prompt_file, defaults)
        if not prompts:
            raise ConfigError([f"--prompt_file {options.prompt_file}: holds no prompts"])
        for prompt in prompts:
            if prompt.sample_sampler:
                problem = sampler_problem(prompt.sample_sampler, f"--prompt_file {options.prompt_file} (prompt {prompt.index + 1}) --ss")
                if problem:
                    raise ConfigError([problem])
    else:
        prompts = [SamplePrompt(0, options.prompt or "", options.negative_prompt, defaults.width, defaults.height,
                                None, defaults.sample_steps, defaults.scale)]
    base_seed = options.seed if options.seed is not None else random.randrange(2**31)
    if options.seed is None and any(p.seed is None for p in prompts):
        log.info("seed %d (pass --seed %d to make the same images again)", base_seed, base_seed)
    return [p if p.seed is not None else replace(p, seed=base_seed + p.index) for p in prompts]


def _output_paths(output: str, prompts: list[SamplePrompt]) -> list[Path]:
    """A .png output names the image (several prompts: NAME_00.png, NAME_01.png, ...); a folder gets
    `<time>_<prompt#>_<seed>.png` files, as training names its samples. A prompt line's `--f NAME` (gen_img.py's
    file name) wins in both cases: NAME.png in the output's folder (NAME_<prompt#>.png when NAME is taken)."""
    from lorakit.sampling.gen_jobs import safe_file_name

    path = Path(output)
    folder = path.parent if path.suffix.lower() == ".png" else path
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
    targets, named = [], set()
    for p in prompts:
        name = p.extras.get("file_name")
        if name:
            stem = safe_file_name(name)[: -len(".png")]
            stem = stem if stem not in named else f"{stem}_{p.index:02d}"
            named.add(stem)
            targets.append(folder / f"{stem}.png")
        elif path.suffix.lower() == ".png":
            targets.append(path if len(prompts) == 1 else path.with_name(f"{path.stem}_{p.index:02d}{path.suffix}"))
        else:
            targets.append(path / f"{stamp}_{p.index:02d}_{p.seed}.png")
    return targets


# ---------------------------------------------------------------------------------------------------------
# placing and generating
# ---------------------------------------------------------------------------------------------------------


def _place(comps: Any, plan: Plan) -> None:
    """Move the model to the device in the asked precision (after merging, which ran in float32 or wider)."""
    from lorakit.families.common.layers import Fp8Linear, to_fp8

    for module in (comps.vae, *comps.text_encoders):
        _move(module, plan.device, plan.dtype)
    denoiser_dtype = plan.denoiser_dtype or plan.dtype
    if denoiser_dtype == "fp8":
        _move(comps.denoiser, plan.device, plan.dtype)  # Fp8Linear keeps its float8 weights through the cast
        if not any(isinstance(m, Fp8Linear) for m in comps.denoiser.modules()):  # the family left it to us
            log.info("denoiser: %d linear layers store float8_e4m3fn weights", to_fp8(comps.denoiser))
    else:
        _move(comps.denoiser, plan.device, denoiser_dtype)
    for module in (comps.denoiser, comps.vae, *comps.text_encoders):
        module.eval()


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    # a cast only where needed: diffusers warns about every `.to(dtype)`, even to the dtype a model already has
    current = next(module.parameters(), None)
    if current is not None and current.dtype != dtype:
        module.to(dtype=dtype)
    module.to(device=device)


def _generate(family: Any, comps: Any, prompts: list[SamplePrompt], targets: list[Path], options: SampleOptions,
              device: torch.device) -> list[Path]:
    from lorakit.families.common.prompt_weighting import plain_text
    from lorakit.sampling.generate import generate_sample

    pipelines: dict[str | None, Any] = {}
    written = []
    for prompt, target in zip(prompts, targets):
        sampler = (prompt.sample_sampler or options.sampler or "").lower() or None
        if sampler not in pipelines:
            pipelines[sampler] = _pipeline(family, comps, sampler)
            if options.offload:
                offload_models(pipelines[sampler], device)
        inputs = None
        if options.text_masks:  # the prompt encoded by the family, its padding hidden
            inputs = family.masked_prompt_inputs(comps, plain_text(prompt.prompt), plain_text(prompt.negative_prompt),
                                                 options.text_masks)
        image = generate_sample(pipelines[sampler], prompt, clip_skip=options.clip_skip, inputs=inputs)
        if image.size != (prompt.width, prompt.height):
            log.warning("%s: the pipeline made a %dx%d image (asked for %dx%d)", target, *image.size, prompt.width, prompt.height)
        written.append(write_png(image, target))
    return written


def _pipeline(family: Any, comps: Any, sampler: str | None) -> Any:
    from lorakit.objectives.samplers import SAMPLERS

    pipe = family.pipeline(comps, sampler) if sampler else family.pipeline(comps)
    pipe.set_progress_bar_config(disable=True)
    used = type(pipe.scheduler).__name__
    if sampler and SAMPLERS[sampler][0] != used:
        log.warning("--sampler %s: this model samples with its own %s (as sd-scripts does)", sampler, used)
    return pipe


def offload_models(pipe: Any, device: torch.device) -> None:
    """--offload: the models stay on the CPU and each moves to `device` only while it runs, the one before it going
    back (diffusers' model CPU offload); on the CPU there is nothing to move."""
    if device.type == "cpu":
        log.info("--offload: the model runs on the CPU; nothing to offload")
        return
    install_offload(pipe, device)


def install_offload(pipe: Any, device: torch.device) -> None:
    pipe.enable_model_cpu_offload(device=device)


def write_png(image: Any, path: Path) -> Path:
    """Write to a temporary name in the same folder, then rename: an interrupted run leaves no partial image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as tmp:
        image.save(tmp, format="PNG")
    return path
