"""`lorakit generate` with ControlNets (gen_img.py's --control_net_models, --control_net_lllite_models,
--control_net_multipliers/--control_net_weights, --control_net_ratios, --control_net_preps, --guide_image_path and the
prompt line's --cn), on the files lorakit's ControlNet trainer writes: an SD 1.x ControlNet and a FLUX.1 ControlNet
against diffusers' own ControlNet pipelines with the same file, an SDXL ControlNet-LLLite against lorakit's
training-time sampling with the same file; every problem reported before anything loads."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.cli.main import main
from lorakit.families.base import ModelSource
from lorakit.families.registry import get_family
from lorakit.objectives.samplers import build_sampler

from test_generate import PROMPT, assert_within_2, pixels
from test_sample_command import write_sd_model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """Tiny models, a ControlNet for each (written by the trainer's own save code, with the zero-initialised
    layers made random so that they change the image) and two control images."""
    from lorakit.families.flux.tiny import build_tiny_flux, save_pipeline_folder
    from lorakit.families.sdxl.tiny import build_tiny_sdxl, save_sdxl_diffusers_folder

    root = tmp_path_factory.mktemp("gen_cn")
    out = SimpleNamespace(sd=write_sd_model(root / "sd1"), sdxl=root / "sdxl", flux=root / "flux")
    save_sdxl_diffusers_folder(build_tiny_sdxl(seed=0), out.sdxl)
    save_pipeline_folder(build_tiny_flux(0), out.flux)
    out.sd_cn, out.sd_cn_folder = _sd_controlnet(out.sd, root, seed=1)
    out.sd_cn2, _ = _sd_controlnet(out.sd, root / "second", seed=2)
    out.flux_cn, out.flux_cn_folder = _flux_controlnet(out.flux, root)
    out.lllite = _lllite(out.sdxl, root)
    out.guide, out.guide2 = root / "guide.png", root / "guide2.png"
    square = Image.new("RGB", (64, 64), (10, 10, 10))
    square.paste((250, 250, 250), (12, 16, 44, 52))
    square.save(out.guide)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(out.guide2)
    return out


def _randomized(module: torch.nn.Module, fragments: tuple[str, ...], seed: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if any(fragment in name for fragment in fragments):
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def _sd_controlnet(model: Path, root: Path, seed: int) -> tuple[Path, Path]:
    from diffusers import ControlNetModel

    family = get_family("sd")
    module = ControlNetModel.from_unet(family.load_model(ModelSource(str(model))).denoiser)
    _randomized(module, ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out"), seed, 0.3)
    control = family.controlnet(None)
    root.mkdir(parents=True, exist_ok=True)
    control.save(module, root / "cn.safetensors", {}, None, "safetensors")
    control.save_folder(module, root / "cn_diffusers")
    return root / "cn.safetensors", root / "cn_diffusers"


def _flux_controlnet(model: Path, root: Path) -> tuple[Path, Path]:
    from lorakit.families.flux.controlnet import new_controlnet

    family = get_family("flux")
    module = new_controlnet(family.load_model(ModelSource(str(model))).denoiser, 1, 1)
    _randomized(module, ("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder"), 3, 0.5)
    control = family.controlnet(None)
    control.save(module, root / "flux_cn.safetensors", {}, None, "safetensors")
    control.save_folder(module, root / "flux_cn_diffusers")
    return root / "flux_cn.safetensors", root / "flux_cn_diffusers"


def _lllite(model: Path, root: Path) -> Path:
    from lorakit.families.sdxl.controlnet import ControlNetLLLite

    family = get_family("sdxl")
    module = ControlNetLLLite(family.load_model(ModelSource(str(model))).denoiser, 8, 8)
    _randomized(module, ("up.0",), 4, 0.3)
    family.controlnet(None).save(module, root / "lllite.safetensors", {}, None, "safetensors")
    return root / "lllite.safetensors"


def generate(model: Path, out: Path, *extra: str, prompt: str = PROMPT, steps: int = 3) -> np.ndarray:
    argv = ["generate", "--ckpt", str(model), "--prompt", prompt, "--W", "64", "--H", "64", "--steps", str(steps),
            "--seed", "7", "--scale", "5", "--outdir", str(out), "--sequential_file_name", *extra]
    assert main(argv) == 0
    images = sorted(out.glob("*.png"))
    assert len(images) == 1
    return pixels(images[0])


def sd_pipeline(model: Path, *controlnets):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    nets = [ControlNetModel.from_pretrained(str(c), local_files_only=True) if c.is_dir()
            else ControlNetModel.from_single_file(str(c), config=str(c.parent / "cn_diffusers"), local_files_only=True)
            for c in controlnets]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(str(model), controlnet=nets[0] if len(nets) == 1 else nets,
                                                             safety_checker=None, local_files_only=True)
    pipe.scheduler = build_sampler("ddim", "epsilon")  # generate's default sampler
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_theirs(pipe, image, steps: int = 3, **kwargs) -> np.ndarray:
    return pixels(pipe(prompt=PROMPT, negative_prompt="", image=image, num_inference_steps=steps, width=64, height=64,
                       guidance_scale=5.0, generator=[torch.Generator().manual_seed(7)], **kwargs).images[0])


def test_sd_controlnet_file_and_folder_equal_diffusers(files, tmp_path):
    guide = Image.open(files.guide).convert("RGB")
    base = generate(files.sd, tmp_path / "base")
    from_file = generate(files.sd, tmp_path / "file", "--control_net_models", str(files.sd_cn),
                         "--guide_image_path", str(files.guide))
    assert np.abs(from_file - base).mean() > 1.0  # the ControlNet shows
    assert_within_2(from_file, sd_theirs(sd_pipeline(files.sd, files.sd_cn), guide))
    from_folder = generate(files.sd, tmp_path / "folder", "--control_net_models", str(files.sd_cn_folder),
                           prompt=f"{PROMPT} --cn {files.guide}")
    assert_within_2(from_folder, from_file)


def test_sd_controlnet_weight_and_ratio_are_gen_img_s(files, tmp_path):
    """--control_net_weights 0.5 scales the residuals; ratio 0.25 over 4 steps guides steps 0 and 1 (i / 4 <= 0.25),
    which is diffusers' control_guidance_end 0.5."""
    guide = Image.open(files.guide).convert("RGB")
    ours = generate(files.sd, tmp_path / "a", "--control_net_models", str(files.sd_cn), "--control_net_weights", "0.5",
                    "--control_net_ratios", "0.25", "--guide_image_path", str(files.guide), steps=4)
    theirs = sd_theirs(sd_pipeline(files.sd, files.sd_cn), guide, steps=4, controlnet_conditioning_scale=0.5,
                       control_guidance_end=0.5)
    assert_within_2(ours, theirs)
    full = sd_theirs(sd_pipeline(files.sd, files.sd_cn), guide, steps=4, controlnet_conditioning_scale=0.5)
    assert np.abs(full - theirs).max() > 2  # the ratio changed the image


def test_two_controlnets_with_their_own_guides_equal_diffusers_multi_controlnet(files, tmp_path):
    ours = generate(files.sd, tmp_path / "two", "--control_net_models", str(files.sd_cn), str(files.sd_cn2),
                    "--control_net_multipliers", "0.6", "0.9", "--guide_image_path", str(files.guide), str(files.guide2))
    images = [Image.open(files.guide).convert("RGB"), Image.open(files.guide2).convert("RGB")]
    theirs = sd_theirs(sd_pipeline(files.sd, files.sd_cn, files.sd_cn2), images, controlnet_conditioning_scale=[0.6, 0.9])
    assert_within_2(ours, theirs)


def test_canny_prep_equals_the_edge_image(files, tmp_path):
    from lorakit.prep.canny import canny

    edges = tmp_path / "edges.png"
    rgb = np.asarray(Image.open(files.guide2).convert("RGB"))
    Image.fromarray(canny(rgb, 50, 150), "L").convert("RGB").save(edges)
    prepped = generate(files.sd, tmp_path / "prep", "--control_net_models", str(files.sd_cn), "--control_net_preps",
                       "canny_50_150", "--guide_image_path", str(files.guide2))
    given = generate(files.sd, tmp_path / "given", "--control_net_models", str(files.sd_cn), "--guide_image_path", str(edges))
    assert np.array_equal(prepped, given)


def test_flux_controlnet_file_equals_diffusers(files, tmp_path):
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    ours = generate(files.flux, tmp_path / "flux", "--scale", "1", "--control_net_models", str(files.flux_cn),
                    "--guide_image_path", str(files.guide))
    base = generate(files.flux, tmp_path / "flux_base", "--scale", "1")
    assert np.abs(ours - base).mean() > 1.0
    controlnet = FluxControlNetModel.from_pretrained(str(files.flux_cn_folder), local_files_only=True)
    pipe = FluxControlNetPipeline.from_pretrained(str(files.flux), controlnet=controlnet, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt=PROMPT, control_image=Image.open(files.guide).convert("RGB"), num_inference_steps=3, width=64,
                  height=64, guidance_scale=3.5, generator=[torch.Generator().manual_seed(7)]).images[0]
    assert_within_2(ours, pixels(theirs))


def _training_time_sample(files, negative: str) -> np.ndarray:
    """The LLLite file sampled as `lorakit controlnet` samples during training (its Trainable and pipeline)."""
    from lorakit.sampling.generate import generate_sample
    from lorakit.sampling.prompts import SamplePrompt
    from lorakit.training.controlnet import CONTROLNET

    family = get_family("sdxl")
    comps = family.load_model(ModelSource(str(files.sdxl)))
    cfg = SimpleNamespace(controlnet_model_name_or_path=str(files.lllite), network_weights=None, cond_emb_dim=8,
                          network_dim=8, network_dropout=None, output_name="x", lllite=True)
    trainable = CONTROLNET.build(cfg, None, family, comps, torch.device("cpu"))
    pipe = trainable.sample_pipeline(family, comps, "ddim")
    pipe.set_progress_bar_config(disable=True)
    prompt = SamplePrompt(0, PROMPT, negative, width=64, height=64, seed=7, sample_steps=3, scale=5.0,
                          extras={"controlnet_image": str(files.guide)})
    spelled, inputs = trainable.sample_inputs(prompt)
    return pixels(generate_sample(pipe, spelled, inputs=inputs))


def test_lllite_equals_training_time_sampling(files, tmp_path):
    negative = "blurry"
    ours = generate(files.sdxl, tmp_path / "lllite", "--control_net_lllite_models", str(files.lllite),
                    "--guide_image_path", str(files.guide), "--negative_prompt", negative)
    base = generate(files.sdxl, tmp_path / "base", "--negative_prompt", negative)
    assert np.abs(ours - base).mean() > 1.0
    assert_within_2(ours, _training_time_sample(files, negative))
    off = generate(files.sdxl, tmp_path / "off", "--control_net_lllite_models", str(files.lllite), "--control_net_multipliers",
                   "0", "--negative_prompt", negative, prompt=f"{PROMPT} --cn {files.guide}")
    assert np.array_equal(off, base)  # multiplier 0: LLLite adds nothing, as in sd-scripts
    first = generate(files.sdxl, tmp_path / "ratio", "--control_net_lllite_models", str(files.lllite), "--control_net_ratios",
                     "0", "--negative_prompt", negative, prompt=f"{PROMPT} --cn {files.guide}")
    # ratio 0 guides the first step only: its mark stays, and the later steps differ
    assert np.abs(first - base).max() > 2 and not np.array_equal(first, ours)


def test_ratio_counts_steps_as_gen_img():
    from lorakit.sampling.gen_control import kept_steps

    assert [kept_steps(r, 4) for r in (0.0, 0.24, 0.25, 0.5, 0.99, 1.0)] == [1, 1, 2, 3, 4, 4]
    assert kept_steps(-1.0, 4) == 0 and kept_steps(0.4, 3) == 2


def test_guide_images_are_taken_in_groups_as_gen_img():
    from lorakit.sampling.gen_control import ControlPlan, ControlSpec, job_control_images

    plan = ControlPlan(None, [ControlSpec("a"), ControlSpec("b")], ["g0", "g1", "g2", "g3", "g4"])
    line = SimpleNamespace(control_images=None)
    assert [job_control_images(plan, line, n) for n in range(3)] == [("g0", "g1"), ("g2", "g3"), ("g0", "g1")]
    assert job_control_images(plan, SimpleNamespace(control_images=("x",)), 0) == ("x", "x")


def test_problems_are_reported_together_before_loading(files, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT} --cn {tmp_path / 'missing.png'}\nno control image here\n", encoding="utf-8")
    code = main(["generate", "--ckpt", str(files.sd), "--from_file", str(prompts), "--outdir", str(tmp_path / "o"),
                 "--control_net_models", str(files.lllite), str(tmp_path / "nowhere.safetensors"),
                 "--control_net_ratios", "1", "0.5", "0.2", "--control_net_preps", "sobel"])
    err = capsys.readouterr().err
    assert code == 2
    for fragment in ("not an SD 1.x/2.x ControlNet", "it is an SDXL ControlNet-LLLite file", "nowhere.safetensors: file or "
                     "folder not found", "--control_net_ratios: 3 values for 2", "--control_net_preps sobel: unknown",
                     "missing.png: file not found", ":2: no control image"):
        assert fragment in err, fragment
    code = main(["generate", "--ckpt", str(files.sdxl), "--prompt", "x", "--outdir", str(tmp_path / "o"),
                 "--control_net_models", str(files.sd_cn), "--guide_image_path", str(files.guide)])
    assert code == 2 and "take ControlNet-LLLite files; give them with --control_net_lllite_models" in capsys.readouterr().err
    code = main(["generate", "--ckpt", str(files.flux), "--prompt", "x", "--outdir", str(tmp_path / "o"),
                 "--control_net_models", str(files.sd_cn), "--guide_image_path", str(files.guide)])
    assert code == 2 and "not a FLUX.1 ControlNet file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_sd_controlnet_img2img_and_inpainting_equal_diffusers(files, tmp_path, task):
    """With --image_path (and --mask_path) the ControlNet runs in diffusers' ControlNet img2img / inpaint pipelines."""
    import diffusers
    from diffusers import ControlNetModel

    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(init)
    mask_image = Image.new("L", (64, 64), 0)
    mask_image.paste(255, (16, 16, 48, 48))
    mask_image.save(mask)
    extra = ["--image_path", str(init), "--strength", "0.7"] + (["--mask_path", str(mask)] if task == "inpaint" else [])
    ours = generate(files.sd, tmp_path / "ours", "--control_net_models", str(files.sd_cn), "--guide_image_path",
                    str(files.guide), *extra, steps=4)
    plain = generate(files.sd, tmp_path / "plain", *extra, steps=4)
    assert np.abs(ours - plain).mean() > 1.0
    name = {"img2img": "StableDiffusionControlNetImg2ImgPipeline", "inpaint": "StableDiffusionControlNetInpaintPipeline"}[task]
    controlnet = ControlNetModel.from_pretrained(str(files.sd_cn_folder), local_files_only=True)
    pipe = getattr(diffusers, name).from_pretrained(str(files.sd), controlnet=controlnet, safety_checker=None,
                                                    local_files_only=True)
    pipe.scheduler = build_sampler("ddim", "epsilon")
    pipe.set_progress_bar_config(disable=True)
    # gen_img.py's default weight is 1.0 (these pipelines' own default is 0.8)
    kwargs = {"controlnet_conditioning_scale": 1.0, **({"mask_image": [Image.open(mask)]} if task == "inpaint" else {})}
    theirs = pipe(prompt=PROMPT, negative_prompt="", image=[Image.open(init).convert("RGB")], strength=0.7,
                  control_image=[Image.open(files.guide).convert("RGB")], num_inference_steps=4, width=64, height=64,
                  guidance_scale=5.0, generator=[torch.Generator().manual_seed(7)], **kwargs).images[0]
    assert_within_2(ours, pixels(theirs))


def test_lllite_img2img_and_highres_fix_without_control(files, tmp_path):
    """LLLite guides SDXL img2img; --highres_fix_disable_control_net leaves the second pass to the plain pipeline."""
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(6).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(init)
    lllite = ("--control_net_lllite_models", str(files.lllite), "--guide_image_path", str(files.guide))
    guided = generate(files.sdxl, tmp_path / "guided", *lllite, "--image_path", str(init), "--strength", "0.7")
    plain = generate(files.sdxl, tmp_path / "plain", "--image_path", str(init), "--strength", "0.7")
    assert np.abs(guided - plain).mean() > 1.0
    highres = ("--W", "128", "--H", "128", "--highres_fix_scale", "0.5", "--highres_fix_steps", "2", "--strength", "0.6")
    off = generate(files.sd, tmp_path / "off", "--control_net_models", str(files.sd_cn), "--guide_image_path",
                   str(files.guide), *highres, "--highres_fix_disable_control_net")
    on = generate(files.sd, tmp_path / "on", "--control_net_models", str(files.sd_cn), "--guide_image_path",
                  str(files.guide), *highres)
    assert off.shape == (128, 128, 3) and np.abs(off - on).mean() > 1.0
