"""`--network_module=networks.lora` on SD3 and FLUX is the family's own LoRA module (as sd-scripts' per-family
scripts read it): the family's `--network_args` work with it, and the file records the family's module."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from helpers import write_dreambooth_folder
from lorakit.adapters.spec import make_target_spec
from lorakit.cli.main import main
from lorakit.config import parse_train_args
from lorakit.errors import ConfigError
from lorakit.families.registry import get_family


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_dreambooth_folder(tmp_path_factory.mktemp("data"), count=1, repeats=1)


def run(model_args: list[str], data: Path, out: Path, *extra: str) -> tuple[dict, dict]:
    args = ["train", *model_args, f"--train_data_dir={data}", "--resolution=64", f"--output_dir={out}",
            "--output_name=tiny", "--network_module=networks.lora", "--network_dim=6", "--max_train_steps=1",
            "--learning_rate=1e-2", "--seed=1", "--max_data_loader_n_workers=0", *extra]
    assert main(args) == 0
    with safe_open(str(out / "tiny.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_sd3_docs_example_with_networks_lora(tmp_path, data_dir):
    """docs/sd3.md's train_t5xxl example, with the SD3 keys sd-scripts' lora_sd3 reads."""
    from lorakit.families.sd3.tiny import build_tiny_sd3, save_sai_file

    model = save_sai_file(build_tiny_sd3(1, "sd3.5m"), tmp_path / "sai" / "sd3.5_medium.safetensors")
    state, meta = run([f"--pretrained_model_name_or_path={model}"], data_dir, tmp_path / "out", "--network_args",
                      "train_t5xxl=True", "split_qkv=True", "emb_dims=[2,0,0,0,0,0]", "train_block_indices=1",
                      "x_mlp_dim=0", "--text_encoder_lr", "1e-5", "2e-5", "5e-6")
    names = {k.split(".")[0] for k in state}
    assert meta["ss_network_module"] == "networks.lora_sd3"
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in names  # train_t5xxl
    assert state["lora_unet_context_embedder.lora_down.weight"].shape[0] == 2  # emb_dims
    assert not any(n.startswith("lora_unet_joint_blocks_0_") for n in names)  # train_block_indices
    assert not any("x_block_mlp" in n for n in names)  # x_mlp_dim=0
    assert state["lora_unet_joint_blocks_1_x_block_attn_qkv.lora_down.weight"].shape[0] == 18  # split: 3 x 6


def test_flux_keys_with_networks_lora(tmp_path, data_dir):
    from lorakit.families.flux.tiny import build_tiny_flux, save_bfl_files

    files = save_bfl_files(build_tiny_flux(0), tmp_path / "bfl")
    model = [f"--pretrained_model_name_or_path={files['flux1']}", f"--clip_l={files['clip_l']}",
             f"--t5xxl={files['t5xxl']}", f"--ae={files['ae']}"]
    state, meta = run(model, data_dir, tmp_path / "out", "--network_args", "train_t5xxl=True", "split_qkv=True",
                      "in_dims=[2,0,0,0,0]", "train_single_block_indices=1")
    names = {k.split(".")[0] for k in state}
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert any(n.startswith("lora_te3_") for n in names) and "lora_unet_img_in" in names
    assert not any(n.startswith("lora_unet_single_blocks_0_") for n in names)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_other_families_refuse_transformer_keys_by_name(family):
    with pytest.raises(ConfigError) as error:
        make_target_spec(get_family(family), module="networks.lora", args={"train_t5xxl": "True", "conv_dim": "4"})
    assert error.value.problems == [
        f"--network_args train_t5xxl: an option of the SD3 and FLUX.1 LoRA modules only; {get_family(family).title} "
        "models have no such layers (remove it)"
    ]


def test_options_accept_family_keys_and_refuse_unknown_ones(tmp_path):
    base = [f"--pretrained_model_name_or_path={tmp_path}", f"--train_data_dir={tmp_path}", f"--output_dir={tmp_path}",
            "--network_module=networks.lora", "--resolution=64"]
    parse_train_args(base + ["--network_args", "train_t5xxl=True", "emb_dims=[1,1,1,1,1,1]", "in_dims=[1,1,1,1,1]"])
    with pytest.raises(ConfigError, match="no_such_key"):
        parse_train_args(base + ["--network_args", "no_such_key=1"])
