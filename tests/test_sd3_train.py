"""SD3 / SD3.5 end to end: `lorakit train` on tiny models from diffusers folders and SAI single files."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from helpers import write_dreambooth_folder
from lorakit.cli.main import main
from lorakit.families.sd3.tiny import build_tiny_sd3, save_pipeline_folder, save_sai_file, save_text_encoder_files



@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd3")
    sd3, sd35m = build_tiny_sd3(0, "sd3"), build_tiny_sd3(1, "sd3.5m")
    files = {"sd3_folder": save_pipeline_folder(sd3, root / "sd3_diffusers")}
    files["sd3_file"] = save_sai_file(sd3, root / "sai" / "sd3_medium_incl_clips_t5xxl.safetensors")
    files["sd35m_file"] = save_sai_file(sd35m, root / "sai35" / "sd3.5_medium.safetensors")
    files["sd35m_bare"] = save_sai_file(sd35m, root / "bare" / "sd3.5_medium_no_te.safetensors", include=())
    files.update({f"part_{k}": v for k, v in save_text_encoder_files(sd35m, root / "bare").items()})
    return files


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_dreambooth_folder(tmp_path_factory.mktemp("data"), count=2, repeats=1)


def train(model: Path, data: Path, out: Path, *extra: str) -> tuple[dict, dict]:
    args = [
        "train", f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", "--resolution=64",
        f"--output_dir={out}", "--output_name=tiny", "--network_module=networks.lora_sd3", "--network_dim=4",
        "--network_alpha=2", "--max_train_steps=2", "--learning_rate=1e-2", "--seed=1", "--max_data_loader_n_workers=0",
        *extra,
    ]
    assert main(args) == 0
    with safe_open(str(out / "tiny.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def modules(state: dict) -> set[str]:
    return {k.split(".")[0] for k in state}


def test_unet_only_from_diffusers_folder(models, data_dir, tmp_path):
    state, meta = train(models["sd3_folder"], data_dir, tmp_path, "--network_train_unet_only", "--weighting_scheme=logit_normal")
    names = modules(state)
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv" in names and "lora_unet_joint_blocks_0_context_block_mlp_fc1" in names
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1" in names
    assert "lora_unet_joint_blocks_1_context_block_mlp_fc1" not in names  # the last text stream has no MLP
    assert not any(n.startswith("lora_te") for n in names)
    assert state["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (96, 4)
    assert any(state[k].abs().sum() > 0 for k in state if k.endswith("lora_up.weight"))  # it trained
    assert meta["ss_base_model_version"] == "medium"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-medium/lora"
    assert meta["ss_weighting_scheme"] == "logit_normal"


def test_sai_single_file_with_clip_and_t5(models, data_dir, tmp_path):
    state, meta = train(
        models["sd35m_file"], data_dir, tmp_path, "--network_args", "train_t5xxl=True", "--apply_lg_attn_mask",
        "--apply_t5_attn_mask", "--clip_l_dropout_rate=0.5", "--t5_dropout_rate=0.5", "--training_shift=3.0",
        "--weighting_scheme=sigma_sqrt", "--pos_emb_random_crop_rate=1.0",
    )
    names = modules(state)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in names
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in names
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv" in names  # SD3.5 Medium's second attention
    assert meta["ss_base_model_version"] == "5-medium"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert meta["ss_apply_lg_attn_mask"] == "True"


def test_split_qkv_per_layer_dims_and_embedders(models, data_dir, tmp_path):
    state, _ = train(
        models["sd35m_file"], data_dir, tmp_path, "--network_train_unet_only", "--network_args", "split_qkv=True",
        "x_mlp_dim=2", "context_mod_dim=0", "emb_dims=[1,0,2,0,3,1]", "train_block_indices=0",
    )
    names = modules(state)
    up = state["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"]
    assert up.shape == (96, 12)  # three rank-4 LoRAs, block-diagonal
    assert up[:32, 4:].abs().sum() == 0 and up[32:64, :4].abs().sum() == 0 and up[:32, :4].abs().sum() > 0
    assert float(state["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"]) == 6.0  # 3α: each part keeps α/r
    assert state["lora_unet_joint_blocks_0_x_block_mlp_fc1.lora_down.weight"].shape[0] == 2
    assert not any("context_block_adaLN" in n for n in names)
    assert not any("joint_blocks_1_" in n for n in names)
    assert state["lora_unet_x_embedder_proj.lora_down.weight"].shape == (2, 16, 2, 2)
    assert state["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"].shape == (64, 3)
    assert "lora_unet_t_embedder_mlp_0" not in names and "lora_unet_context_embedder" in names


def test_separate_component_files_and_cached_text(models, data_dir, tmp_path):
    flags = [f"--{k}={models['part_' + k]}" for k in ("clip_l", "clip_g", "t5xxl", "vae")]
    state, _ = train(models["sd35m_bare"], data_dir, tmp_path, *flags, "--network_train_unet_only", "--cache_text_encoder_outputs", "--cache_latents")
    assert modules(state)


def test_cached_t5_outputs_while_clip_loras_train(models, data_dir, tmp_path, capsys):
    """Seed 001: "T5XXL output can be cached for CLIP-L and G LoRA training" — the CLIPs run every step and learn."""
    state, _ = train(models["sd3_folder"], data_dir, tmp_path / "partial", "--cache_text_encoder_outputs")
    for prefix in ("lora_te1_", "lora_te2_"):
        ups = [v for k, v in state.items() if k.startswith(prefix) and k.endswith("lora_up.weight")]
        assert ups and any(v.abs().sum() > 0 for v in ups), f"{prefix} modules trained"
    assert not any(k.startswith("lora_te3_") for k in state)
    args = [
        "train", f"--pretrained_model_name_or_path={models['sd3_folder']}", f"--train_data_dir={data_dir}", "--resolution=64",
        f"--output_dir={tmp_path / 't5'}", "--network_module=networks.lora_sd3", "--max_train_steps=1",
        "--cache_text_encoder_outputs", "--network_args", "train_t5xxl=True",
    ]
    assert main(args) == 2
    assert "train_t5xxl=True cannot be used with --cache_text_encoder_outputs" in capsys.readouterr().err


def test_missing_text_encoder_is_named(models, data_dir, tmp_path, capsys):
    args = [
        "train", f"--pretrained_model_name_or_path={models['sd35m_bare']}", f"--train_data_dir={data_dir}",
        "--resolution=64", f"--output_dir={tmp_path}", "--network_module=networks.lora_sd3", "--max_train_steps=1",
    ]
    assert main(args) != 0
    assert "--clip_l" in capsys.readouterr().err


def test_sd_only_options_are_refused(models, data_dir, tmp_path, capsys):
    args = [
        "train", "--family=sd3", f"--pretrained_model_name_or_path={models['sd3_file']}", f"--train_data_dir={data_dir}",
        "--resolution=64", f"--output_dir={tmp_path}", "--clip_skip=2", "--max_train_steps=1",
    ]
    assert main(args) != 0
    assert "--clip_skip" in capsys.readouterr().err


def test_save_format_diffusers_writes_the_peft_layout(models, data_dir, tmp_path):
    state, _ = train(models["sd3_folder"], data_dir, tmp_path, "--network_train_unet_only", "--save_format=diffusers")
    assert state and all(k.startswith("transformer.") for k in state)
    assert any(k.endswith("attn.to_q.lora_A.weight") for k in state)
