"""`lorakit controlnet` on a tiny SD 1.5 model: sd-scripts' options and file layout, the diffusers folder, diffusers'
ControlNet pipeline renders what lorakit samples, conditioning problems at start-up, exact resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from helpers import load_local_pipeline, write_tiny_checkpoints
from lorakit.cli.main import main
from lorakit.families.base import ModelSource
from lorakit.families.registry import get_family
from lorakit.objectives.samplers import build_sampler
from lorakit.sampling.generate import generate_sample
from lorakit.sampling.prompts import SamplePrompt
from lorakit.training.controlnet import CONTROLNET


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory) -> Path:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("cn_sd"), "sd1")["folder"]


def pairs(root: Path, count: int = 3, size: int = 64) -> tuple[Path, Path]:
    """Images of a white square and their conditioning images (a red mask where the square is)."""
    images, conditioning = root / "img", root / "cond"
    images.mkdir(parents=True)
    conditioning.mkdir()
    for i in range(count):
        box = (4 + 10 * i, 8, 28 + 10 * i, 40)
        picture = Image.new("RGB", (size, size), (20, 40, 60))
        picture.paste((250, 250, 250), box)
        picture.save(images / f"p{i}.png")
        (images / f"p{i}.txt").write_text("a square", encoding="utf-8")
        mask = Image.new("RGB", (size, size))
        mask.paste((255, 0, 0), box)
        mask.save(conditioning / f"p{i}.png")
    return images, conditioning


def cn_args(model: Path, images: Path, conditioning: Path, out: Path, *extra: str) -> list[str]:
    return ["controlnet", f"--pretrained_model_name_or_path={model}", f"--train_data_dir={images}",
            f"--conditioning_data_dir={conditioning}", "--resolution=64", f"--output_dir={out}", "--output_name=cn",
            "--max_train_steps=2", "--learning_rate=1e-3", "--seed=1", "--max_data_loader_n_workers=0",
            "--caption_extension=.txt", *extra]


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _lorakit_sample(model: Path, controlnet_file: Path, control: Path):
    family = get_family("sd")
    comps = family.load_model(ModelSource(str(model)))
    cfg = SimpleNamespace(controlnet_model_name_or_path=str(controlnet_file), output_name="x", lllite=False)
    trainable = CONTROLNET.build(cfg, None, family, comps, torch.device("cpu"))
    pipe = trainable.sample_pipeline(family, comps, "ddim")
    pipe.set_progress_bar_config(disable=True)
    prompt = SamplePrompt(0, "a square", width=64, height=64, seed=4, sample_steps=3, scale=5.0,
                          extras={"controlnet_image": str(control)})
    spelled, inputs = trainable.sample_inputs(prompt)
    return generate_sample(pipe, spelled, inputs=inputs, output_type="np")


def test_sd_controlnet_files_and_diffusers(sd_model, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    images, conditioning = pairs(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a square --cn {conditioning / 'p0.png'} --d 1 --w 64 --h 64 --s 2\n")
    out = tmp_path / "out"
    assert main(cn_args(sd_model, images, conditioning, out, f"--sample_prompts={prompts}",
                        "--sample_every_n_steps=2")) == 0
    assert len(list((out / "sample").glob("cn_000002_00_*.png"))) == 1
    state, meta = read(out / "cn.safetensors")
    for key in ("time_embed.0.weight", "input_blocks.0.0.weight", "input_hint_block.0.weight",
                "input_hint_block.14.weight", "zero_convs.0.0.weight", "middle_block_out.0.weight",
                "middle_block.1.proj_in.weight", "input_blocks.1.0.in_layers.0.weight"):
        assert key in state, key
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/controlnet"
    assert not torch.equal(state["middle_block_out.0.weight"], torch.zeros_like(state["middle_block_out.0.weight"]))
    folder = out / "cn_diffusers"
    from_folder = ControlNetModel.from_pretrained(folder, local_files_only=True)
    from_file = ControlNetModel.from_single_file(str(out / "cn.safetensors"), config=str(folder), local_files_only=True)
    for key, value in from_folder.state_dict().items():
        assert torch.equal(value, from_file.state_dict()[key]), key

    ours = _lorakit_sample(sd_model, out / "cn.safetensors", conditioning / "p1.png")
    pipe = load_local_pipeline(StableDiffusionControlNetPipeline, sd_model, controlnet=from_file, safety_checker=None)
    pipe.scheduler = build_sampler("ddim", "epsilon")
    theirs = pipe("a square", image=Image.open(conditioning / "p1.png"), num_inference_steps=3, guidance_scale=5.0,
                  width=64, height=64, generator=torch.Generator().manual_seed(4), output_type="np").images[0]
    assert abs(ours - theirs).max() < 1e-4


def test_layout_round_trip(sd_model):
    from diffusers import ControlNetModel

    from lorakit.families.sd.controlnet import controlnet_to_ldm, ldm_to_controlnet

    unet = get_family("sd").load_model(ModelSource(str(sd_model))).denoiser
    module = ControlNetModel.from_unet(unet)
    state = module.state_dict()
    back = ldm_to_controlnet(controlnet_to_ldm(state, dict(module.config)), dict(module.config))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_conditioning_problems_named_together_at_start(sd_model, tmp_path, capsys):
    images, conditioning = pairs(tmp_path)
    (conditioning / "p0.png").unlink()
    Image.new("RGB", (32, 64)).save(conditioning / "p1.png")
    (conditioning / "p2.png").write_bytes(b"not a png")
    assert main(cn_args(sd_model, images, conditioning, tmp_path / "out", "--lllite")) == 2
    err = capsys.readouterr().err
    for part in ("p0.png has no conditioning image", "p1.png is 32x64 but its image", "p2.png cannot be read",
                 "--lllite: ControlNet-LLLite is for SDXL"):
        assert part in err, part
    assert not (tmp_path / "out").exists()


def test_exact_resume(sd_model, tmp_path):
    images, conditioning = pairs(tmp_path)
    full, first, resumed = tmp_path / "full", tmp_path / "first", tmp_path / "resumed"
    extra = ("--save_every_n_steps=2", "--save_state", "--max_train_steps=3", "--flip_aug")
    assert main(cn_args(sd_model, images, conditioning, full, *extra)) == 0
    assert main(cn_args(sd_model, images, conditioning, first, *extra)) == 0
    assert main(cn_args(sd_model, images, conditioning, resumed, *extra,
                        f"--resume={first / 'cn-step00000002-state'}")) == 0
    a, b = read(full / "cn.safetensors")[0], read(resumed / "cn.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----- SDXL: ControlNet-LLLite -----

@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory) -> Path:
    from lorakit.families.sdxl.tiny import build_tiny_sdxl, save_sdxl_diffusers_folder

    folder = tmp_path_factory.mktemp("cn_sdxl") / "sdxl"
    save_sdxl_diffusers_folder(build_tiny_sdxl(seed=0), folder)
    return folder


def test_sdxl_lllite_file_layout_round_trip_and_samples(sdxl_model, tmp_path):
    from lorakit.families.sdxl.controlnet import KEY_PATTERN, ControlNetLLLite

    images, conditioning = pairs(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a square --cn {conditioning / 'p0.png'} --d 1 --w 64 --h 64 --s 2\n")
    out = tmp_path / "out"
    assert main(cn_args(sdxl_model, images, conditioning, out, "--lllite", "--cond_emb_dim=8", "--network_dim=8",
                        f"--sample_prompts={prompts}", "--sample_every_n_steps=2")) == 0
    assert len(list((out / "sample").glob("cn_000002_00_*.png"))) == 1
    assert not (out / "cn_diffusers").exists()  # LLLite has no diffusers layout
    state, meta = read(out / "cn.safetensors")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/control-net-lllite"
    assert state and all(KEY_PATTERN.match(key) for key in state), [k for k in state if not KEY_PATTERN.match(k)]
    name = "lllite_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"  # the tiny model's second level
    assert state[f"{name}.conditioning1.0.weight"].shape == (4, 3, 4, 4)  # cond_emb_dim / 2 channels, 4x4 stride 4
    assert state[f"{name}.conditioning1.2.weight"].shape == (8, 4, 4, 4)  # depth 2: stride 4 more, to 1/16
    assert state[f"{name}.down.0.weight"].shape[0] == 8 and state[f"{name}.mid.0.weight"].shape == (8, 16)
    assert not any(state[k].abs().sum() == 0 for k in state if k.endswith("up.0.weight"))  # trained from zero
    unet = get_family("sdxl").load_model(ModelSource(str(sdxl_model))).denoiser
    again = ControlNetLLLite(unet, 8, 8)
    again.load_file_state(state, "file")
    back = again.state_dict_file()
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    sdxl_layers = {k.split(".")[0] for k in state}
    assert {n.rsplit("_", 2)[0] for n in sdxl_layers} >= {"lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1",
                                                           "lllite_unet_middle_block_1_transformer_blocks_0_attn2"}


# ----- FLUX.1 ControlNet -----

def test_flux_controlnet_files_and_diffusers(tmp_path):
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    from lorakit.families.flux.tiny import build_tiny_flux, save_pipeline_folder

    model = save_pipeline_folder(build_tiny_flux(0), tmp_path / "flux")
    images, conditioning = pairs(tmp_path)
    out = tmp_path / "out"
    assert main(cn_args(model, images, conditioning, out, "--controlnet_double_blocks=1",
                        "--controlnet_single_blocks=1", "--guidance_scale=1.0")) == 0
    state, meta = read(out / "cn.safetensors")
    for key in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight",
                "controlnet_blocks.0.weight", "controlnet_blocks_for_single.0.weight", "pos_embed_input.weight",
                "input_hint_block.0.weight", "input_hint_block.14.weight"):
        assert key in state, key
    assert meta["modelspec.architecture"] == "flux-1-dev/controlnet"
    assert state["controlnet_blocks.0.weight"].abs().sum() > 0  # trained from zero
    from_folder = FluxControlNetModel.from_pretrained(out / "cn_diffusers", local_files_only=True)
    assert from_folder.input_hint_block is not None and len(from_folder.single_transformer_blocks) == 1

    family = get_family("flux")
    comps = family.load_model(ModelSource(str(model)))
    cfg = SimpleNamespace(controlnet_model_name_or_path=str(out / "cn.safetensors"), output_name="x", lllite=False,
                          controlnet_double_blocks=1, controlnet_single_blocks=1)
    trainable = CONTROLNET.build(cfg, None, family, comps, torch.device("cpu"))
    for key, value in from_folder.state_dict().items():  # the single file reads back into diffusers' names
        assert torch.equal(value, trainable.module.state_dict()[key]), key
    pipe = trainable.sample_pipeline(family, comps, "euler")
    pipe.set_progress_bar_config(disable=True)
    prompt = SamplePrompt(0, "a square", width=64, height=64, seed=4, sample_steps=3, scale=3.5,
                          extras={"controlnet_image": str(conditioning / "p1.png")})
    spelled, inputs = trainable.sample_inputs(prompt)
    ours = generate_sample(pipe, spelled, inputs=inputs, output_type="np")
    theirs_pipe = load_local_pipeline(FluxControlNetPipeline, model, controlnet=from_folder)
    theirs_pipe.scheduler = pipe.scheduler  # the flow scheduler lorakit samples FLUX with
    theirs = theirs_pipe("a square", control_image=Image.open(conditioning / "p1.png"), num_inference_steps=3,
                         guidance_scale=3.5, width=64, height=64, generator=torch.Generator().manual_seed(4),
                         output_type="np").images[0]
    assert abs(ours - theirs).max() < 1e-4
