"""End-to-end training through the `lorakit train` command on tiny SD 1.5 and SD 2 (v-prediction) models."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from helpers import write_dreambooth_folder, write_tiny_checkpoints
from lorakit.cli.main import main


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("models")
    return {version: write_tiny_checkpoints(root, version) for version in ("sd1", "sd2v")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_dreambooth_folder(tmp_path_factory.mktemp("data"))


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", "--resolution=64",
        f"--output_dir={out}", "--output_name=tiny", "--network_module=networks.lora", "--network_dim=4",
        "--network_alpha=2", "--max_train_steps=2", "--learning_rate=1e-3", "--seed=1",
        "--max_data_loader_n_workers=0", *extra,
    ]


def read_lora(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize(
    "version,source,extra",
    [
        ("sd1", "folder", []),
        ("sd1", "safetensors", ["--cache_latents"]),
        ("sd2v", "folder", ["--v2", "--v_parameterization"]),
        ("sd2v", "ckpt", ["--v2", "--v_parameterization", "--gradient_checkpointing"]),
    ],
)
def test_two_steps_train_and_save(models, data_dir, tmp_path, version, source, extra):
    out = tmp_path / "out"
    assert main(train_args(models[version][source], data_dir, out, *extra)) == 0
    tensors, meta = read_lora(out / "tiny.safetensors")
    assert any(k.startswith("lora_unet_") for k in tensors) and any(k.startswith("lora_te_") for k in tensors)
    ups = [v for k, v in tensors.items() if k.endswith(".lora_up.weight")]
    assert any(v.abs().sum() > 0 for v in ups), "two optimizer steps must move the zero-initialised up weights"
    assert meta["ss_v2"] == str("--v2" in extra)
    expected_version = {"sd1": "sd_v1", "sd2v": "sd_v2_v"}[version]
    assert meta["ss_base_model_version"] == expected_version
    assert meta["modelspec.prediction_type"] == ("v" if "--v_parameterization" in extra else "epsilon")
    assert meta["ss_steps"] == "2"


def test_epoch_and_step_file_names(models, data_dir, tmp_path):
    out = tmp_path / "out"
    # 4 images x 2 repeats at batch 2 = 4 steps per epoch; 8 steps = 2 epochs
    args = train_args(models["sd1"]["folder"], data_dir, out, "--train_batch_size=2", "--save_every_n_epochs=1", "--save_every_n_steps=3")
    args[args.index("--max_train_steps=2")] = "--max_train_steps=8"
    assert main(args) == 0
    names = sorted(p.name for p in out.iterdir())
    # the last epoch is only written as the final file, as sd-scripts does
    assert names == ["tiny-000001.safetensors", "tiny-step00000003.safetensors", "tiny-step00000006.safetensors", "tiny.safetensors"]


def test_unet_only_conv_network_and_ckpt_output(models, data_dir, tmp_path):
    out = tmp_path / "out"
    args = train_args(
        models["sd1"]["folder"], data_dir, out, "--network_train_unet_only", "--network_args", "conv_dim=4", "conv_alpha=1",
        "--save_model_as=ckpt", "--save_precision=fp16",
    )
    assert main(args) == 0
    import torch

    state = torch.load(out / "tiny.ckpt", weights_only=True)
    assert not any(k.startswith("lora_te_") for k in state)
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in state
    assert state["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[-2:] == (3, 3)
    assert all(v.dtype == torch.float16 for v in state.values())


def test_metadata_keys_of_the_reference_are_present(models, data_dir, tmp_path):
    out = tmp_path / "out"
    assert main(train_args(models["sd1"]["safetensors"], data_dir, out, "--training_comment=hello")) == 0
    _, meta = read_lora(out / "tiny.safetensors")
    always = """ss_session_id ss_training_started_at ss_output_name ss_learning_rate ss_text_encoder_lr ss_unet_lr
    ss_num_train_images ss_num_validation_images ss_num_reg_images ss_num_batches_per_epoch ss_num_epochs
    ss_gradient_checkpointing ss_gradient_accumulation_steps ss_max_train_steps ss_lr_warmup_steps ss_lr_scheduler
    ss_network_module ss_network_dim ss_network_alpha ss_network_dropout ss_mixed_precision ss_full_fp16 ss_v2
    ss_base_model_version ss_clip_skip ss_max_token_length ss_cache_latents ss_seed ss_lowram ss_noise_offset
    ss_multires_noise_iterations ss_multires_noise_discount ss_adaptive_noise_scale ss_zero_terminal_snr
    ss_training_comment ss_sd_scripts_commit_hash ss_optimizer ss_max_grad_norm ss_caption_dropout_rate
    ss_caption_dropout_every_n_epochs ss_caption_tag_dropout_rate ss_face_crop_aug_range ss_prior_loss_weight
    ss_min_snr_gamma ss_scale_weight_norms ss_ip_noise_gamma ss_debiased_estimation ss_noise_offset_random_strength
    ss_ip_noise_gamma_random_strength ss_loss_type ss_huber_schedule ss_huber_scale ss_huber_c ss_fp8_base
    ss_fp8_base_unet ss_validation_seed ss_validation_split ss_max_validation_steps ss_validate_every_n_epochs
    ss_validate_every_n_steps ss_resize_interpolation ss_training_finished_at ss_steps ss_epoch
    ss_batch_size_per_device ss_total_batch_size ss_resolution ss_color_aug ss_flip_aug ss_random_crop
    ss_shuffle_caption ss_enable_bucket ss_bucket_no_upscale ss_min_bucket_reso ss_max_bucket_reso ss_keep_tokens
    ss_dataset_dirs ss_reg_dataset_dirs ss_tag_frequency ss_bucket_info
    ss_sd_model_hash ss_new_sd_model_hash ss_sd_model_name sshs_model_hash sshs_legacy_hash
    modelspec.sai_model_spec modelspec.architecture modelspec.implementation modelspec.title modelspec.resolution
    modelspec.date modelspec.prediction_type""".split()
    missing = [k for k in always if k not in meta]
    assert not missing, missing
    assert meta["ss_training_comment"] == "hello"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_sd_model_name"] == "sd1.safetensors"


def test_network_weights_are_the_starting_point(models, data_dir, tmp_path):
    from safetensors.torch import save_file

    first, second = tmp_path / "a", tmp_path / "b"
    assert main(train_args(models["sd1"]["folder"], data_dir, first)) == 0
    tensors, _ = read_lora(first / "tiny.safetensors")
    start = {k: (v.fill_(0.5) if k.endswith("lora_up.weight") else v) for k, v in tensors.items()}
    save_file(start, str(tmp_path / "start.safetensors"))
    args = train_args(models["sd1"]["folder"], data_dir, second, f"--network_weights={tmp_path / 'start.safetensors'}")
    args[args.index("--learning_rate=1e-3")] = "--learning_rate=1e-7"
    assert main(args) == 0
    after, _ = read_lora(second / "tiny.safetensors")
    assert after.keys() == start.keys()
    for key, value in after.items():
        assert (value - start[key]).abs().max() < 1e-4, key


def test_dry_run_prints_plan_and_loads_nothing(models, data_dir, tmp_path, capsys, monkeypatch):
    from lorakit.families.registry import get_family

    def must_not_load(*_args, **_kwargs):
        raise AssertionError("--dry_run loaded the model")

    monkeypatch.setattr(type(get_family("sd")), "load", must_not_load)
    args = train_args(models["sd1"]["folder"], data_dir, tmp_path / "out", "--dry_run")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "total steps       2" in printed and "64x64" in printed
    assert not (tmp_path / "out").exists()
    # a dry run checks what a run would: a missing model is named (before, it planned on regardless)
    assert main(train_args(tmp_path / "not_there.safetensors", data_dir, tmp_path / "out", "--dry_run")) == 2
    assert "not_there.safetensors: no such model file or diffusers folder" in capsys.readouterr().err


def test_tensorboard_logging(models, data_dir, tmp_path):
    logs = tmp_path / "logs"
    args = train_args(models["sd1"]["folder"], data_dir, tmp_path / "out", f"--logging_dir={logs}", "--log_prefix=run_")
    assert main(args) == 0
    runs = list(logs.iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("run_")
    assert list(runs[0].rglob("events.out.tfevents.*")), "TensorBoard event file expected"


def test_full_bf16_trains_the_network_in_bf16(models, data_dir, tmp_path):
    import torch

    out = tmp_path / "out"
    assert main(train_args(models["sd1"]["folder"], data_dir, out, "--mixed_precision=bf16", "--full_bf16")) == 0
    tensors, _ = read_lora(out / "tiny.safetensors")
    # without --save_precision the file keeps the training dtype, as sd-scripts writes it
    assert {v.dtype for k, v in tensors.items() if k.endswith(".weight")} == {torch.bfloat16}
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))


def test_console_log_file_and_logged_config(models, data_dir, tmp_path, restore_root_logging):
    from lorakit.config import parse_train_args
    from lorakit.training.trackers import tracker_config

    log_file = tmp_path / "train.log"
    args = train_args(models["sd1"]["folder"], data_dir, tmp_path / "out", f"--console_log_file={log_file}",
                      "--console_log_simple", "--console_log_level=INFO", "--log_config", "--wandb_api_key=not-a-real-key")
    assert main(args) == 0
    text = log_file.read_text(encoding="utf-8")
    assert "prefer the WANDB_API_KEY environment variable" in text and "saved" in text
    cfg, _ = parse_train_args(args[1:])
    logged = tracker_config(cfg)
    assert "wandb_api_key" not in logged and logged["pretrained_model_name_or_path"] == "sd1_diffusers"


def test_accelerate_launch_module_form(models, data_dir, tmp_path):
    """`accelerate launch -m lorakit train …`, the form that replaces `accelerate launch train_network.py …`."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes=1", "--num_machines=1",
              "--mixed_precision=no", "--dynamo_backend=no", "-m", "lorakit"]
    proc = subprocess.run(launch + train_args(models["sd1"]["folder"], data_dir, out), capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "tiny.safetensors").exists()


def test_cached_text_encoder_outputs_train_exactly_like_encoding_every_step(models, data_dir, tmp_path, monkeypatch):
    """SD 1.x with --cache_text_encoder_outputs: the frozen encoder runs once per distinct caption, and the
    losses are the ones of a run that encodes every step (sd-scripts has no such cache for SD 1.x)."""
    from transformers import CLIPTextModel

    from lorakit.config import parse_train_args
    from lorakit.training.run import train

    encoded: list[int] = []
    original_forward = CLIPTextModel.forward

    def counting_forward(self, input_ids=None, *args, **kwargs):
        encoded.append(int(input_ids.shape[0]))
        return original_forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(CLIPTextModel, "forward", counting_forward)
    runs = {}
    for cached in (False, True):
        extra = ["--network_train_unet_only", "--max_train_steps=8", *(["--cache_text_encoder_outputs"] if cached else [])]
        args = [a for a in train_args(models["sd1"]["folder"], data_dir, tmp_path / str(cached), *extra)[1:]
                if a != "--max_train_steps=2"]
        cfg, _ = parse_train_args(args)
        encoded.clear()
        runs[cached] = (train(cfg).step_losses, list(encoded))
    (every_step_losses, every_step_calls), (cached_losses, cached_calls) = runs[False], runs[True]
    assert cached_losses == every_step_losses and len(cached_losses) == 8
    # one epoch: 4 images with their own captions, 2 repeats each, batch 1
    assert every_step_calls == [1] * 8  # every step encodes its caption
    assert cached_calls == [1] * 4  # each distinct caption once


def test_cached_text_encoder_outputs_need_unet_only(models, data_dir, tmp_path, capsys):
    args = train_args(models["sd1"]["folder"], data_dir, tmp_path / "out", "--cache_text_encoder_outputs")
    assert main(args) != 0
    assert "--cache_text_encoder_outputs needs --network_train_unet_only" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.safetensors"))
