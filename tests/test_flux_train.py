"""FLUX.1 end to end: `lorakit train --family=flux` on a tiny FLUX from a diffusers folder and from BFL files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import write_dreambooth_folder
from lorakit.cli.main import main
from lorakit.families.flux.tiny import build_tiny_flux, save_bfl_files, save_pipeline_folder

@pytest.fixture(scope="module")
def flux_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux")
    comps = build_tiny_flux(0)
    files = save_bfl_files(comps, root / "bfl")
    files["folder"] = save_pipeline_folder(comps, root / "diffusers")
    return files


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_dreambooth_folder(tmp_path_factory.mktemp("data"))


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--family=flux", f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}",
        "--resolution=64", f"--output_dir={out}", "--output_name=tiny", "--network_module=networks.lora_flux",
        "--network_dim=4", "--network_alpha=2", "--max_train_steps=2", "--learning_rate=1e-3", "--seed=1",
        "--max_data_loader_n_workers=0", *extra,
    ]


def read_lora(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def bfl_flags(files: dict[str, Path]) -> list[str]:
    return [f"--clip_l={files['clip_l']}", f"--t5xxl={files['t5xxl']}", f"--ae={files['ae']}"]


def test_seed_guide_command_from_bfl_files(flux_files, data_dir, tmp_path):
    """The FLUX guide's recommended flags (raw prediction, shift sampling, guidance 1.0) on BFL files."""
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks toy --w 64 --h 64 --s 2 --d 1 --g 1.0\n", encoding="utf-8")
    extra = [
        *bfl_flags(flux_files), f"--sample_prompts={prompts}", "--sample_every_n_steps=2", "--timestep_sampling=shift", "--discrete_flow_shift=3.1582",
        "--model_prediction_type=raw", "--guidance_scale=1.0", "--gradient_checkpointing", "--save_precision=bf16",
        "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk",  # T5 cached while CLIP-L trains
    ]
    assert main(train_args(flux_files["flux1"], data_dir, out, *extra)) == 0
    tensors, meta = read_lora(out / "tiny.safetensors")
    names = {k.rsplit(".", 2)[0] for k in tensors}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in names and "lora_unet_single_blocks_1_linear1" in names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert tensors["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"].abs().sum() > 0
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (3 * 32, 4)
    assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 32 + 4 * 32, 4)
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["ss_timestep_sampling"] == "shift" and meta["ss_model_prediction_type"] == "raw"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert list((out / "sample").glob("*.png")), "a sample image through FluxPipeline with the LoRA attached"


@pytest.mark.parametrize(
    "extra",
    [
        ["--network_train_unet_only", "--fp8_base", "--mixed_precision=bf16", "--apply_t5_attn_mask"],
        ["--network_train_unet_only", "--gradient_checkpointing", "--cpu_offload_checkpointing", "--weighting_scheme=logit_normal"],
        ["--network_train_unet_only", "--network_args", "train_blocks=single", "single_mod_dim=0"],
    ],
    ids=["fp8_mask", "offload_checkpointing", "single_blocks_only"],
)
def test_low_vram_options_from_folder(flux_files, data_dir, tmp_path, extra):
    out = tmp_path / "out"
    assert main(train_args(flux_files["folder"], data_dir, out, *extra)) == 0
    tensors, meta = read_lora(out / "tiny.safetensors")
    assert not any(k.startswith("lora_te") for k in tensors)
    if "train_blocks=single" in extra:
        modules = {k.rsplit(".", 2)[0] for k in tensors}
        assert modules == {f"lora_unet_single_blocks_{i}_{n}" for i in (0, 1) for n in ("linear1", "linear2")}
    assert all(v.isfinite().all() for v in tensors.values())


def test_blocks_to_swap_beyond_the_model_is_a_clear_error(flux_files, data_dir, tmp_path, capsys):
    """The tiny model has 1 double and 2 single blocks, so no block may be swapped (sd-scripts' limit)."""
    assert main(train_args(flux_files["folder"], data_dir, tmp_path / "out", "--blocks_to_swap=1")) == 2
    assert "--blocks_to_swap 1" in capsys.readouterr().err


def test_split_qkv_trains_block_diagonal_factors(flux_files, data_dir, tmp_path):
    """`--network_args split_qkv=True`: one rank-4 LoRA per q/k/v (and the MLP part of linear1), saved as
    sd-scripts saves them (block-diagonal up) but with alpha × parts so every part keeps its α/r."""
    out = tmp_path / "out"
    assert main(train_args(flux_files["folder"], data_dir, out, "--network_train_unet_only", "--network_args", "split_qkv=True")) == 0
    tensors, _ = read_lora(out / "tiny.safetensors")
    qkv = tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    linear1 = tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert qkv.shape == (3 * 32, 12) and linear1.shape == (3 * 32 + 4 * 32, 16)
    assert float(tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 6.0
    assert float(tensors["lora_unet_single_blocks_0_linear1.alpha"]) == 8.0
    assert float(tensors["lora_unet_single_blocks_0_linear2.alpha"]) == 2.0
    for up, starts in ((qkv, (0, 32, 64, 96)), (linear1, (0, 32, 64, 96, 224))):
        for j in range(len(starts) - 1):
            rows = slice(starts[j], starts[j + 1])
            assert up[rows, 4 * j:4 * (j + 1)].abs().sum() > 0  # it trained
            assert up[rows, :4 * j].abs().sum() == 0 and up[rows, 4 * (j + 1):].abs().sum() == 0


@pytest.mark.parametrize(
    "extra",
    [
        ["--network_module=networks.lora_flux", "--network_args", "dora_wd=True", "train_blocks=single"],
        ["--network_module=networks.dylora", "--network_args", "unit=2"],
        ["--network_module=networks.oft_flux", "--network_alpha=0.01", "--network_train_unet_only"],
        ["--network_module=lycoris.kohya", "--network_args", "algo=lokr", "preset=attn-only", "factor=4"],
    ],
    ids=["dora", "dylora", "oft_flux", "lycoris_lokr"],
)
def test_other_algorithms_train_on_flux_from_the_command_line(flux_files, data_dir, tmp_path, extra):
    """The FLUX family checks only its own network_args; DoRA, DyLoRA, OFT and LyCORIS check theirs."""
    out = tmp_path / "out"
    assert main(train_args(flux_files["folder"], data_dir, out, *extra)) == 0
    tensors, meta = read_lora(out / "tiny.safetensors")
    assert meta["ss_base_model_version"] == "flux1"
    assert any(k.startswith(("lora_unet_", "oft_unet_")) and v.abs().sum() > 0 for k, v in tensors.items())
    assert all(v.isfinite().all() for v in tensors.values())


def test_without_network_module_the_file_says_lora_flux(flux_files, data_dir, tmp_path):
    """sd-scripts always names the module; without --network_module lorakit trains the family's LoRA and says so."""
    out = tmp_path / "out"
    args = [a for a in train_args(flux_files["folder"], data_dir, out, "--network_train_unet_only") if not a.startswith("--network_module")]
    assert main(args) == 0
    _, meta = read_lora(out / "tiny.safetensors")
    assert meta["ss_network_module"] == "networks.lora_flux"


SEED_001_COMMAND = """
--pretrained_model_name_or_path flux1-dev.safetensors --clip_l sd3/clip_l.safetensors --t5xxl sd3/t5xxl_fp16.safetensors
--ae ae.safetensors --cache_latents_to_disk --save_model_as safetensors --sdpa --persistent_data_loader_workers
--max_data_loader_n_workers 2 --seed 42 --gradient_checkpointing --mixed_precision bf16 --save_precision bf16
--network_module networks.lora_flux --network_dim 4 --network_train_unet_only
--optimizer_type adamw8bit --learning_rate 1e-4
--cache_text_encoder_outputs --cache_text_encoder_outputs_to_disk --fp8_base
--highvram --max_train_epochs 4 --save_every_n_epochs 1 --dataset_config dataset_1024_bs2.toml
--output_dir path/to/output/dir --output_name flux-lora-name
--timestep_sampling shift --discrete_flow_shift 3.1582 --model_prediction_type raw --guidance_scale 1.0
"""


def test_seed_001_command_runs_with_only_paths_changed(flux_files, tmp_path):
    """The FLUX guide's sample command, word for word except its five paths (and the dataset's resolution)."""
    images = write_dreambooth_folder(tmp_path / "images", count=2, repeats=1)
    toml = tmp_path / "dataset_1024_bs2.toml"
    toml.write_text(
        f'[general]\nshuffle_caption = false\ncaption_extension = ".caption"\n\n[[datasets]]\nresolution = 64\nbatch_size = 2\n\n'
        f'  [[datasets.subsets]]\n  image_dir = "{(images / "1_sks toy").as_posix()}"\n  num_repeats = 1\n',
        encoding="utf-8",
    )
    out = tmp_path / "output"
    paths = {
        "flux1-dev.safetensors": str(flux_files["flux1"]), "sd3/clip_l.safetensors": str(flux_files["clip_l"]),
        "sd3/t5xxl_fp16.safetensors": str(flux_files["t5xxl"]), "ae.safetensors": str(flux_files["ae"]),
        "dataset_1024_bs2.toml": str(toml), "path/to/output/dir": str(out),
    }
    argv = [paths.get(word, word) for word in SEED_001_COMMAND.split()]
    assert main(["train", *argv]) == 0
    saved = sorted(p.name for p in out.glob("*.safetensors"))
    assert saved == [f"flux-lora-name-00000{e}.safetensors" for e in (1, 2, 3)] + ["flux-lora-name.safetensors"]
    tensors, meta = read_lora(out / "flux-lora-name.safetensors")
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_base_model_version"] == "flux1"
    assert not any(k.startswith("lora_te") for k in tensors)
    assert all(v.dtype == torch.bfloat16 for k, v in tensors.items() if k.endswith("weight"))
    assert list(images.rglob("*_flux.npz")), "--cache_latents_to_disk wrote sd-scripts' FLUX cache files"


def test_t5_and_per_layer_dims_and_block_indices_train(flux_files, data_dir, tmp_path):
    """+T5 (`train_t5xxl=True`), per-layer ranks and block indices, from BFL files."""
    out = tmp_path / "out"
    extra = [*bfl_flags(flux_files), "--network_args", "train_t5xxl=True", "img_attn_dim=8", "txt_mlp_dim=0",
             "train_double_block_indices=0", "train_single_block_indices=1"]
    assert main(train_args(flux_files["flux1"], data_dir, out, *extra)) == 0
    tensors, _ = read_lora(out / "tiny.safetensors")
    modules = {k.rsplit(".", 2)[0] for k in tensors}
    t5_ups = [v for k, v in tensors.items() if k.startswith("lora_te3_") and k.endswith("lora_up.weight")]
    assert t5_ups and any(v.abs().sum() > 0 for v in t5_ups), "T5's LoRA trained"
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 8
    assert not any("txt_mlp" in m for m in modules)
    assert not any(m.startswith("lora_unet_single_blocks_0_") for m in modules)
    assert any(m.startswith("lora_unet_single_blocks_1_") for m in modules)
