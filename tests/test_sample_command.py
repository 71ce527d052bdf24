"""`lorakit sample`: images from tiny models of every family with LoRAs merged into the weights.

The merged result is checked against an independent path: the same file loaded into the trainer's network and
attached at the same multiplier (the bypass forward, no weight changes), images made by the same pipeline.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import targets_of
from lorakit.adapters.formats import save_lora_file
from lorakit.adapters.network import LoRANetwork
from lorakit.cli.main import main
from lorakit.config.validate import build_config
from lorakit.families.registry import resolve_family
from lorakit.sampling.generate import generate_sample
from lorakit.sampling.prompts import SamplePrompt

PROMPT = "a red square on a blue background"
SIZE = {"sd": 64, "sdxl": 64, "sd3": 64, "flux": 64}
VERSIONS = {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1", "sd3": "sd3"}


def lora_cfg(conv: bool = False, dim: int = 4, alpha: float = 2.0):
    """The network options a family's adapter_targets reads."""
    args = ["conv_dim=2", "conv_alpha=1"] if conv else None
    return SimpleNamespace(
        network_dim=dim, network_alpha=alpha, network_args=args,
        network_kwargs=lambda: dict(a.split("=", 1) for a in (args or [])),
        network_train_unet_only=False, network_train_text_encoder_only=False,
    )


def load_model(path: Path):
    cfg = build_config({"pretrained_model_name_or_path": str(path)}, skip_requirements=True)
    family = resolve_family(cfg)
    return family, family.load(cfg)


def write_random_lora(model: Path, file: Path, *, seed: int, conv: bool = False, dim: int = 4, scale: float = 0.15) -> Path:
    """A LoRA on every layer the family's trainer network adapts, with random factors, saved as training saves it."""
    family, comps = load_model(model)
    network = LoRANetwork(targets_of(family, comps, lora_cfg(conv, dim)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    module = {"sd3": "networks.lora_sd3", "flux": "networks.lora_flux"}.get(family.name, "networks.lora")
    save_lora_file(network.state_dict_kohya(), file, {"ss_network_module": module, "ss_base_model_version": VERSIONS[family.name]})
    return file


def attached_image(model: Path, loras: list[tuple[Path, float, SimpleNamespace]], *, seed: int, steps: int = 2, scale: float = 5.0):
    """The independent path: each file loaded into the trainer network it was written from (same options),
    attached (not merged) at its multiplier."""
    from lorakit.adapters.formats import load_lora_file

    family, comps = load_model(model)
    for file, multiplier, cfg in loras:
        state, _ = load_lora_file(file)
        network = LoRANetwork(targets_of(family, comps, cfg))
        network.load_kohya_state_dict(state, source=str(file))
        network.set_multiplier(multiplier)
        network.apply_to()
    pipe = family.pipeline(comps)
    pipe.set_progress_bar_config(disable=True)
    size = SIZE[family.name]
    prompt = SamplePrompt(0, PROMPT, "", size, size, seed, steps, scale)
    return np.asarray(generate_sample(pipe, prompt), dtype=np.int16)


def sample(model: Path, out: Path, *extra: str, seed: int = 1, scale: float = 5.0) -> np.ndarray:
    argv = ["sample", "--ckpt_path", str(model), "--prompt", PROMPT, "--width", "64", "--height", "64", "--steps", "2",
            "--seed", str(seed), "--guidance_scale", str(scale), "--output", str(out), *extra]
    assert main(argv) == 0
    with Image.open(out) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    """PNG bytes: float differences between a merged and an attached LoRA may move a value by one step."""
    diff = np.abs(a - b)
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


# ---------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------


def write_sd_model(folder: Path) -> Path:
    """The tiny SD 1.x with a non-zero bias in the text encoder's final LayerNorm, as real CLIP models have: with
    a zero bias every token's features average to ~0, and the weighted-prompt encoder's mean rescaling divides
    0 by 0 whenever the rounding lands on exactly zero (`families/common/prompt_weighting.py`)."""
    from lorakit.families.sd.tiny import build_tiny_sd, save_sd_diffusers_folder

    comps = build_tiny_sd("sd1", seed=0)
    encoder = comps.text_encoders[0]
    norm = getattr(encoder, "text_model", encoder).final_layer_norm
    with torch.no_grad():
        norm.bias.copy_(torch.linspace(-0.2, 0.3, norm.bias.numel()))
    save_sd_diffusers_folder(comps, folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from lorakit.families.flux.tiny import build_tiny_flux
    from lorakit.families.flux.tiny import save_pipeline_folder as save_flux
    from lorakit.families.sd3.tiny import build_tiny_sd3
    from lorakit.families.sd3.tiny import save_pipeline_folder as save_sd3
    from lorakit.families.sdxl.tiny import build_tiny_sdxl, save_sdxl_diffusers_folder

    root = tmp_path_factory.mktemp("sample_models")
    paths = {"sd": write_sd_model(root / "sd1"), "sdxl": root / "sdxl"}
    save_sdxl_diffusers_folder(build_tiny_sdxl(seed=0), paths["sdxl"])
    paths["sd3"] = save_sd3(build_tiny_sd3(0, "sd3"), root / "sd3")
    paths["flux"] = save_flux(build_tiny_flux(0), root / "flux")
    return paths


@pytest.fixture(scope="module")
def loras(models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sample_loras")
    # the tiny FLUX answers weakly to small factors; larger ones make its LoRA show in the pixels
    files = {name: write_random_lora(path, root / f"{name}.safetensors", seed=3, conv=name in ("sd", "sdxl"),
                                     scale=0.5 if name == "flux" else 0.15)
             for name, path in models.items()}
    files["sd_rank8"] = write_random_lora(models["sd"], root / "sd_rank8.safetensors", seed=5, dim=8)
    return files


@pytest.fixture(scope="module")
def base_image(models, tmp_path_factory):
    """Each family's image without a LoRA (seed 1), made once by the command and shared by the tests."""
    folder, made = tmp_path_factory.mktemp("base_images"), {}

    def get(family: str) -> np.ndarray:
        if family not in made:
            made[family] = sample(models[family], folder / f"{family}.png")
            assert Image.open(folder / f"{family}.png").size == (64, 64)
        return made[family]

    return get


# ---------------------------------------------------------------------------------------------------------
# every family
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_lora_merge_equals_the_attached_network(models, loras, base_image, tmp_path, family):
    base = base_image(family)
    zero = sample(models[family], tmp_path / "zero.png", "--lora", f"{loras[family]};0")
    assert np.array_equal(zero, base)
    merged = sample(models[family], tmp_path / "merged.png", "--lora", f"{loras[family]};0.8")
    assert np.abs(merged - base).mean() > 1.0  # the LoRA shows
    assert_close(merged, attached_image(models[family], [(loras[family], 0.8, lora_cfg(conv=family in ("sd", "sdxl")))], seed=1))


def test_sd_image_equals_diffusers_load_lora_weights(models, loras, tmp_path):
    """An independent consumer: diffusers' own pipeline with the file loaded by `load_lora_weights` at 0.8."""
    from diffusers import StableDiffusionPipeline

    from lorakit.objectives.samplers import build_sampler

    pipe = StableDiffusionPipeline.from_pretrained(models["sd"], local_files_only=True, safety_checker=None)
    pipe.scheduler = build_sampler("ddim", "epsilon")  # training's (and this command's) DDIM settings
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(loras["sd"]), adapter_name="file")
    pipe.set_adapters(["file"], [0.8])
    theirs = pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, width=64, height=64,
                  generator=torch.Generator().manual_seed(1)).images[0]
    ours = sample(models["sd"], tmp_path / "ours.png", "--lora", f"{loras['sd']};0.8")
    assert_close(ours, np.asarray(theirs, dtype=np.int16))


def test_same_seed_same_image_other_seed_differs(models, tmp_path):
    first = sample(models["sd"], tmp_path / "a.png", seed=7)
    assert np.array_equal(sample(models["sd"], tmp_path / "b.png", seed=7), first)
    assert not np.array_equal(sample(models["sd"], tmp_path / "c.png", seed=8), first)


def test_two_loras_of_different_ranks(models, loras, tmp_path):
    """A rank-4 C3Lier file at 0.6 and a rank-8 LierLa file (given by the sd-scripts spelling) at -0.5."""
    merged = sample(models["sd"], tmp_path / "two.png", "--lora", f"{loras['sd']};0.6", "--lora_weights", f"{loras['sd_rank8']};-0.5")
    expected = attached_image(models["sd"], [(loras["sd"], 0.6, lora_cfg(conv=True)), (loras["sd_rank8"], -0.5, lora_cfg(dim=8))], seed=1)
    assert_close(merged, expected)
    single = sample(models["sd"], tmp_path / "one.png", "--lora", f"{loras['sd']};0.6")
    assert np.abs(merged - single).mean() > 1.0


def test_lora_sample_is_the_same_command(models, loras, tmp_path):
    lora = f"{loras['sd']};0.5"
    expected = sample(models["sd"], tmp_path / "a.png", "--lora", lora)
    argv = ["lora", "sample", "--pretrained_model_name_or_path", str(models["sd"]), "--prompt", PROMPT, "--width", "64",
            "--height", "64", "--steps", "2", "--seed", "1", "--cfg_scale", "5", "--out", str(tmp_path / "b.png"),
            "--lora_weights", lora]
    assert main(argv) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png").convert("RGB"), dtype=np.int16), expected)


def test_flux_fp8_transformer(models, loras, tmp_path):
    """sd-scripts' `--flux_dtype fp8`: the transformer's linears in float8 (loaded so, the LoRA merged into them)."""
    image = sample(models["flux"], tmp_path / "fp8.png", "--lora", f"{loras['flux']};0.8", "--flux_dtype", "fp8", "--offload")
    full = sample(models["flux"], tmp_path / "full.png", "--lora", f"{loras['flux']};0.8")
    assert image.shape == (64, 64, 3) and 0 < np.abs(image - full).mean() < 20


def test_sd2_v_single_file(tmp_path):
    """SD 2.x v-prediction from an LDM single file: --v2 --v_parameterization reach the loader and the sampler."""
    from lorakit.families.common.ldm_keys import save_sd_single_file
    from lorakit.families.sd.tiny import build_tiny_sd

    model = tmp_path / "sd2v.safetensors"
    save_sd_single_file(build_tiny_sd("sd2v", seed=0), model, fmt="safetensors")
    v = sample(model, tmp_path / "v.png", "--v2", "--v_parameterization", "--sampler", "euler")
    eps = sample(model, tmp_path / "eps.png", "--v2", "--sampler", "euler")
    assert v.shape == (64, 64, 3) and np.abs(v - eps).mean() > 1.0  # the prediction type is honoured


def test_prompt_file_options_and_folder_output(models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 96 --h 64 --d 5 --s 2\n# comment\na blue circle --n green --l 3 --d 9 --s 1\n", encoding="utf-8")
    out = tmp_path / "images"
    assert main(["sample", "--ckpt_path", str(models["sd"]), "--prompt_file", str(prompts), "--output", str(out),
                 "--width", "64", "--height", "64"]) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name.split("_", 1)[1] for f in files] == ["00_5.png", "01_9.png"]
    assert [Image.open(f).size for f in files] == [(96, 64), (64, 64)]
    assert not list(out.glob(".*"))  # no temporary files left


# ---------------------------------------------------------------------------------------------------------
# other algorithms the trainer writes: DoRA, OFT, LyCORIS
# ---------------------------------------------------------------------------------------------------------


def network_config(model: Path, module: str, args: list[str], dim: int, alpha: float, weights: Path | None = None):
    options = {"pretrained_model_name_or_path": str(model), "network_module": module, "network_args": args,
               "network_dim": dim, "network_alpha": alpha, "network_weights": str(weights) if weights else None}
    return build_config(options, skip_requirements=True)


def write_trained_like_lora(model: Path, file: Path, module: str, args: list[str], dim: int, alpha: float, scale: float,
                            version: str) -> Path:
    """The trainer's own network (`build_network`), moved off its initial values by seeded noise, saved with the
    metadata keys training writes for it."""
    import json

    from helpers import build_from_options

    cfg = network_config(model, module, args, dim, alpha)
    family, comps = load_model(model)
    network = build_from_options(cfg, family, comps, torch.device("cpu"))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in network.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    metadata = {"ss_network_module": module, "ss_network_dim": str(dim), "ss_network_alpha": str(alpha),
                "ss_network_args": json.dumps(cfg.network_kwargs()), "ss_base_model_version": version}
    save_lora_file(network.state_dict_kohya(), file, metadata)
    return file


def factory_attached_image(model: Path, file: Path, module: str, args: list[str], dim: int, alpha: float, multiplier: float):
    from helpers import build_from_options

    family, comps = load_model(model)
    network = build_from_options(network_config(model, module, args, dim, alpha, file), family, comps, torch.device("cpu"))
    network.set_multiplier(multiplier)
    pipe = family.pipeline(comps)
    pipe.set_progress_bar_config(disable=True)
    prompt = SamplePrompt(0, PROMPT, "", 64, 64, 1, 2, 5.0)
    return np.asarray(generate_sample(pipe, prompt), dtype=np.int16)


@pytest.mark.parametrize("family,module,args,dim,alpha,scale", [
    ("sd", "networks.lora", ["dora_wd=True", "conv_dim=2", "conv_alpha=1"], 4, 2.0, 0.1),
    ("sd", "networks.oft", ["enable_all_linear=True"], 4, 1.0, 0.1),  # a loose constraint, so the rotations show
    ("sd", "lycoris.kohya", ["algo=loha", "conv_dim=2", "conv_alpha=1"], 4, 2.0, 0.1),
    ("flux", "networks.oft_flux", ["enable_all_linear=True"], 4, 1.0, 0.3),  # OFT per part of fused q/k/v views
    ("flux", "networks.lora_flux", ["dora_wd=True"], 4, 2.0, 0.3),  # DoRA on fused views
    ("sd3", "networks.lora_sd3", ["split_qkv=True", "emb_dims=[2,2,2,2,2,2]"], 4, 2.0, 0.15),  # rank-3r q/k/v, embedders
], ids=["dora", "oft", "loha", "flux-oft", "flux-dora", "sd3-split-qkv"])
def test_other_algorithms_merge_as_their_networks_run(models, base_image, tmp_path, family, module, args, dim, alpha, scale):
    model = models[family]
    file = write_trained_like_lora(model, tmp_path / "net.safetensors", module, args, dim, alpha, scale, VERSIONS[family])
    base = base_image(family)
    merged = sample(model, tmp_path / "merged.png", "--lora", f"{file};0.7")
    assert np.abs(merged - base).mean() > 1.0
    assert_close(merged, factory_attached_image(model, file, module, args, dim, alpha, 0.7))


def test_file_written_by_lorakit_train(models, base_image, tmp_path):
    """Two training steps (C3Lier, no --network_module: the file says `ss_network_module: None`), then sampled."""
    from accelerate.state import AcceleratorState

    from helpers import write_dreambooth_folder

    data = write_dreambooth_folder(tmp_path / "data", count=2, repeats=1)
    AcceleratorState._reset_state(reset_partial_state=True)
    assert main(["train", f"--pretrained_model_name_or_path={models['sd']}", f"--train_data_dir={data}", "--resolution=64",
                 f"--output_dir={tmp_path / 'out'}", "--output_name=tiny", "--network_dim=4", "--network_alpha=2",
                 "--network_args", "conv_dim=4", "conv_alpha=2", "--max_train_steps=2", "--learning_rate=5e-2", "--seed=1",
                 "--max_data_loader_n_workers=0"]) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    file = tmp_path / "out" / "tiny.safetensors"
    merged = sample(models["sd"], tmp_path / "merged.png", "--lora", str(file))
    assert np.abs(merged - base_image("sd")).mean() > 1.0  # 2 steps at a high rate move it (about 10 of 255)
    args = ["conv_dim=4", "conv_alpha=2"]
    assert_close(merged, factory_attached_image(models["sd"], file, "networks.lora", args, 4, 2.0, 1.0))


# ---------------------------------------------------------------------------------------------------------
# mistakes: exit 2, a message naming the problem, no image
# ---------------------------------------------------------------------------------------------------------


def write_foreign_lora(file: Path, *, metadata: dict[str, str]) -> Path:
    state = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 32),
             "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(32, 4)}
    save_lora_file(state, file, metadata)
    return file


def write_state(file: Path, key: str) -> Path:
    save_lora_file({key: torch.zeros(4, 32)}, file, {})
    return file


@pytest.mark.parametrize("case", ["missing", "family_metadata", "family_keys", "syntax", "sampler", "prompt", "not_yet", "peft", "loha"])
def test_mistakes_exit_2_with_a_message(models, loras, tmp_path, capsys, case):
    out = tmp_path / "out.png"
    extra, expected = {
        "missing": (["--lora", f"{tmp_path / 'nope.safetensors'};1"], "nope.safetensors: file not found"),
        "family_metadata": (["--lora", str(write_foreign_lora(tmp_path / "xl.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"}))],
                            "xl.safetensors: a LoRA for the sdxl family"),
        "family_keys": (["--lora", str(write_foreign_lora(tmp_path / "bare.safetensors", metadata={}))],
                        "key lora_unet_input_blocks_4_1_proj_in.lora_down.weight is for a module this network does not have; "
                        "this file has lora_unet_input_blocks_ keys (an SDXL LoRA)"),
        "syntax": (["--lora", f"{loras['sd']};strong"], "the multiplier after ';' must be a number"),
        "sampler": (["--sampler", "warp_drive"], "--sampler warp_drive: unknown sampler"),
        "prompt": (["--prompt_file", str(tmp_path / "none.txt")], "--prompt_file"),
        "not_yet": (["--do_not_use_t5xxl"], "--do_not_use_t5xxl: not available in lorakit sample yet"),
        "peft": (["--lora", str(write_state(tmp_path / "peft.safetensors", "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"))],
                 "key unet.down_blocks.0.attentions.0.proj_in.lora_A.weight is in the diffusers/PEFT layout"),
        "loha": (["--lora", str(write_state(tmp_path / "loha.safetensors", "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a"))],
                 "key lora_unet_mid_block_attentions_0_proj_in.hada_w1_a is a LoHa tensor"),
    }[case]
    argv = ["sample", "--ckpt_path", str(models["sd"]), "--width", "64", "--height", "64", "--steps", "1",
            "--output", str(out), *extra]
    if case != "prompt":
        argv += ["--prompt", PROMPT]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: " in err and expected in err, err
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_merging_leaves_the_model_forwards_as_they_were(models, loras):
    """Listing FLUX's layers routes the fused q/k/v parts' forwards; once the weights are merged (as
    `lorakit sample` does it) every module runs its own forward again, with nothing added per step."""
    from lorakit.sampling.apply_lora import LoraMerger, parse_lora_spec, read_lora_file
    from lorakit.tools.targets import forwards_restored

    family, comps = load_model(models["flux"])
    roots = [comps.denoiser, *comps.text_encoders]
    patched = lambda: [m for root in roots for m in root.modules() if "forward" in m.__dict__]  # noqa: E731
    assert not patched()
    with forwards_restored(roots):
        merged = LoraMerger(family, comps).merge(read_lora_file(parse_lora_spec(f"{loras['flux']};0.8")))
        assert merged > 0 and patched()  # the views were made and routed while merging
    assert not patched()
