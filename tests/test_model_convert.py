"""`lorakit model convert`: every family's model to the other layout and back gives the same tensors, bit for
bit, under the same names; diffusers' own loaders read every converted file; precisions and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorakit.cli.main import main as cli
from lorakit.families.registry import fixtures

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers folder, named `<subfolder>/<key>`."""
    state = {}
    for file in sorted(folder.rglob("*.safetensors")):
        state.update({f"{file.parent.name}/{k}": v for k, v in load_file(file).items()})
    return state


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].view(torch.uint8) if a[key].dtype.itemsize == 1 else a[key], b[key].view(torch.uint8) if b[key].dtype.itemsize == 1 else b[key]), key


def run(*argv: str) -> None:
    assert cli(["model", "convert", *argv]) == 0


@pytest.fixture(scope="module")
def sd_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    sd = fixtures("sd")
    paths = {}
    for version in ("sd1", "sd2"):
        comps = sd.build_tiny_sd(version, seed=1)
        paths[version] = root / version
        sd.save_sd_diffusers_folder(comps, paths[version])
    sdxl = fixtures("sdxl")
    paths["sdxl"] = root / "sdxl"
    sdxl.save_sdxl_diffusers_folder(sdxl.build_tiny_sdxl(seed=1), paths["sdxl"])
    return paths


@pytest.mark.parametrize("version,flags", [("sd1", []), ("sd2", ["--v2", "--v_parameterization"]), ("sdxl", [])])
def test_unet_models_round_trip_and_diffusers_reads_the_file(sd_models, tmp_path, version, flags):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = sd_models[version]
    single = tmp_path / "model.safetensors"
    run(str(folder), str(single), *flags)
    run(str(single), str(tmp_path / "back"), *flags)
    assert_identical(folder_tensors(folder), folder_tensors(tmp_path / "back"))
    if version == "sd1":  # the other way round (the SD 2.x and SDXL writers are the same code path)
        run(str(tmp_path / "back"), str(tmp_path / "again.safetensors"), *flags)
        assert_identical(load_file(single), load_file(tmp_path / "again.safetensors"))
    pipeline = StableDiffusionXLPipeline if version == "sdxl" else StableDiffusionPipeline
    pipe = pipeline.from_single_file(str(single), config=str(folder), local_files_only=True)
    ours = folder_tensors(folder)
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, ours[f"unet/{key}"]), key
    for key, value in pipe.vae.state_dict().items():
        assert torch.equal(value, ours[f"vae/{key}"]), key
    if version == "sd2":
        scheduler = (tmp_path / "back" / "scheduler" / "scheduler_config.json").read_text()
        assert '"v_prediction"' in scheduler


def test_ckpt_and_half_precision(sd_models, tmp_path):
    run(str(sd_models["sd1"]), str(tmp_path / "model.ckpt"))
    run(str(tmp_path / "model.ckpt"), str(tmp_path / "half.safetensors"), "--save_precision", "fp16")
    with safe_open(str(tmp_path / "half.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16", "I64"}  # position ids stay integers
    run(str(tmp_path / "half.safetensors"), str(tmp_path / "half_folder"))  # loads as stored: fp16 stays fp16
    run(str(tmp_path / "half_folder"), str(tmp_path / "half_again.safetensors"))
    assert_identical(load_file(tmp_path / "half.safetensors"), load_file(tmp_path / "half_again.safetensors"))
    run("--bf16", str(sd_models["sd1"]), str(tmp_path / "bf16.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in load_file(tmp_path / "bf16.safetensors").values() if v.is_floating_point())


@pytest.fixture(scope="module")
def sd3_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    sd3 = fixtures("sd3")
    comps = sd3.build_tiny_sd3(seed=2)
    sd3.save_pipeline_folder(comps, root / "folder")
    parts = sd3.save_text_encoder_files(comps, root / "parts")
    dit = sd3.save_sai_file(comps, root / "parts" / "dit.safetensors", include=())
    return root, parts, dit


def test_sd3_round_trip_packing_and_without_encoders(sd3_files, tmp_path):
    from diffusers import SD3Transformer2DModel

    root, parts, dit = sd3_files
    single = tmp_path / "sd3.safetensors"
    run(str(root / "folder"), str(single))
    for tokenizer_file in parts["t5xxl"].parent.glob("tokenizer*.json"):  # a diffusers folder needs the T5 tokenizer
        (tmp_path / tokenizer_file.name).write_bytes(tokenizer_file.read_bytes())
    run(str(single), str(tmp_path / "back"))
    original = {k: v for k, v in folder_tensors(root / "folder").items()}
    assert_identical(original, folder_tensors(tmp_path / "back"))
    # merge_sd3_safetensors.py: the MMDiT file and the four part files packed into one file, the same file
    run("--dit", str(dit), "--vae", str(parts["vae"]), "--clip_l", str(parts["clip_l"]), "--clip_g", str(parts["clip_g"]),
        "--t5xxl", str(parts["t5xxl"]), "--output", str(tmp_path / "packed.safetensors"))
    assert_identical(load_file(single), load_file(tmp_path / "packed.safetensors"))
    run(str(root / "folder"), str(tmp_path / "dit_vae.safetensors"), "--without_text_encoders")
    keys = set(load_file(tmp_path / "dit_vae.safetensors"))
    assert keys == {k for k in load_file(single) if not k.startswith("text_encoders.")}
    transformer = SD3Transformer2DModel.from_single_file(str(single), config=str(root / "folder"), subfolder="transformer",
                                                         local_files_only=True)
    for key, value in transformer.state_dict().items():
        assert torch.equal(value, original[f"transformer/{key}"]), key


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    flux = fixtures("flux")
    comps = flux.build_tiny_flux(seed=3)
    flux.save_pipeline_folder(comps, root / "folder")
    return root, flux.save_bfl_files(comps, root / "bfl")


def diffusers_flux_converter(inner_dim: int):
    """diffusers' own BFL -> diffusers converter, with its one size constant (FLUX.1's width, 3072) set to the tiny
    model's: the independent reader of our BFL files."""
    import inspect

    from diffusers.loaders import single_file_utils

    source = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in source
    namespace = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def test_flux_bfl_and_diffusers_round_trip(flux_files, tmp_path):
    from diffusers import FluxTransformer2DModel

    root, files = flux_files
    # sd-scripts' convert_diffusers_to_flux.py command line, with the shard file as --diffusers_path
    shard = next((root / "folder" / "transformer").glob("*.safetensors"))
    run("--diffusers_path", str(shard), "--save_to", str(tmp_path / "flux1.safetensors"), "--mem_eff_load_save")
    assert_identical(load_file(files["flux1"]), load_file(tmp_path / "flux1.safetensors"))
    run(str(files["flux1"]), str(tmp_path / "transformer"))
    expected = load_file(shard)
    assert_identical(expected, {k.partition("/")[2]: v for k, v in folder_tensors(tmp_path / "transformer").items()})
    transformer = FluxTransformer2DModel.from_pretrained(str(tmp_path / "transformer"), local_files_only=True)
    inner_dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    converted = diffusers_flux_converter(inner_dim)(load_file(tmp_path / "flux1.safetensors"))
    assert set(converted) == set(expected)
    for key, value in converted.items():
        assert torch.equal(value, expected[key]), key


def test_flux_fp8_and_bf16(flux_files, tmp_path):
    root, files = flux_files
    run("--diffusers_path", str(root / "folder"), "--save_to", str(tmp_path / "fp8.safetensors"), "--save_precision", "fp8")
    stored = load_file(tmp_path / "fp8.safetensors")
    original = load_file(files["flux1"])
    assert all(v.dtype == torch.float8_e4m3fn for v in stored.values())
    for key, value in original.items():
        assert torch.equal(stored[key].view(torch.uint8), value.to(torch.float8_e4m3fn).view(torch.uint8)), key
    run(str(files["flux1"]), str(tmp_path / "bf16.safetensors"), "--save_precision", "bf16")
    assert all(v.dtype == torch.bfloat16 for v in load_file(tmp_path / "bf16.safetensors").values())


def test_refusals_name_every_problem(sd_models, tmp_path, capsys):
    code = cli(["model", "convert", str(sd_models["sd1"]), str(tmp_path / "x.safetensors"), "--save_precision", "fp8",
                "--clip_g", "nowhere.safetensors", "--epoch", "3"])
    err = capsys.readouterr().err
    assert code == 2
    for fragment in ("--epoch", "--clip_g nowhere.safetensors: file not found", "--save_precision fp8"):
        assert fragment in err
    assert not (tmp_path / "x.safetensors").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("x")
    assert cli(["model", "convert", str(sd_models["sd1"]), str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
