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
