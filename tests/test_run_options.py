"""Run options that change how a run goes rather than what it learns: --debug_dataset, --torch_compile, and the
options accepted with a warning because they do nothing in LoRA training (in sd-scripts either)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import resume_args, write_resume_world
from lorakit.config import parse_train_args
from lorakit.config.support import UNSUPPORTED
from lorakit.training.run import train
from lorakit.training.setup import compile_denoiser


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return write_resume_world(tmp_path_factory.mktemp("run_options"))


def test_debug_dataset_shows_the_batches_and_trains_nothing(world, tmp_path, capsys):
    out = tmp_path / "out"
    cfg, _ = parse_train_args(resume_args(world, out, "--debug_dataset", "--flip_aug", "--validation_split=0.25"))
    result = train(cfg)
    text = capsys.readouterr().out
    assert result.saved_files == [] and not list(out.glob("*.safetensors"))
    assert "train: 3 batches in epoch 1" in text and "validation: 1 batches in epoch 1" in text
    assert text.count('caption: "sks toy, a square number') == 3 * 2 + 1
    images = sorted((out / "debug_dataset").glob("*.png"))
    assert len(images) == 7 and Image.open(images[0]).size == (64, 64)


def test_torch_compile_compiles_the_denoiser_in_place():
    cfg, _ = parse_train_args(["--pretrained_model_name_or_path=x", "--train_data_dir=x", "--output_dir=x",
                               "--resolution=64", "--torch_compile", "--dynamo_backend=EAGER"])
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
    x = torch.randn(2, 4)
    expected = module(x)
    names = [n for n, _ in module.named_parameters()]
    compile_denoiser(cfg, module)
    assert module._compiled_call_impl is not None  # nn.Module.compile: calls go through torch.compile
    assert [n for n, _ in module.named_parameters()] == names  # same module, same parameter names
    torch.testing.assert_close(module(x), expected)


def test_options_without_effect_warn():
    argv = ["--pretrained_model_name_or_path=x", "--train_data_dir=x", "--output_dir=x", "--resolution=64"]
    _, warnings = parse_train_args(argv + ["--save_clip", "--t5xxl_device=cpu", "--fused_backward_pass",
                                           "--optimizer_type=adafactor", "--controlnet_model_name_or_path=c"])
    assert any(w.startswith("--save_clip has no effect") for w in warnings)
    assert any(w.startswith("--t5xxl_device has no effect") for w in warnings)
    assert any(w.startswith("--fused_backward_pass applies to full fine-tuning only") for w in warnings)
    assert any(w.startswith("--controlnet_model_name_or_path is read by ControlNet training only") for w in warnings)
    for name in ("save_clip", "fused_backward_pass", "torch_compile", "debug_dataset", "weighted_captions"):
        assert name not in UNSUPPORTED


def test_deepspeed_is_accepted_checked_at_start_up_and_configured(world, tmp_path, monkeypatch):
    import importlib.util

    from lorakit.errors import ConfigError
    from lorakit.training import distributed
    from lorakit.training.preflight import check_run

    argv = resume_args(world, tmp_path, "--deepspeed", "--zero_stage=3", "--offload_optimizer_device=cpu",
                       "--zero3_save_16bit_model", "--fp16_master_weights_and_gradients", "--gradient_accumulation_steps=2")
    cfg, _ = parse_train_args(argv)  # no "not implemented" refusal
    if importlib.util.find_spec("deepspeed") is None:  # this machine: the run stops before any model loads
        with pytest.raises(ConfigError, match="--deepspeed needs the DeepSpeed package, which is not installed"):
            check_run(cfg)
        monkeypatch.setattr(distributed, "deepspeed_problems", lambda cfg: [])
    config = distributed.deepspeed_plugin(cfg, world_size=2).deepspeed_config
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["train_batch_size"] == 2 * 2 * 2
    assert config["gradient_accumulation_steps"] == 2 and config["gradient_clipping"] == 1.0
    assert config["fp16"]["fp16_master_weights_and_grads"] is True
