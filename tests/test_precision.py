"""Frozen weights load in the run's training dtype; --no_half_vae keeps the VAE in float32, bit for bit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import write_dreambooth_folder, write_tiny_checkpoints
from lorakit.config import parse_train_args
from lorakit.families.registry import resolve_family
from lorakit.precision import effective_mixed_precision, load_dtype
from lorakit.training.run import make_accelerator as _make_accelerator
from lorakit.training.setup import setup_session as _setup


def test_load_dtype_follows_mixed_precision_and_no_half_vae():
    assert load_dtype(SimpleNamespace(mixed_precision="bf16")) == torch.bfloat16
    assert load_dtype(SimpleNamespace(mixed_precision="no")) == torch.float32
    assert load_dtype(SimpleNamespace(mixed_precision="bf16", no_half_vae=True)) == torch.float32
    if not torch.cuda.is_available():
        assert effective_mixed_precision(SimpleNamespace(mixed_precision="fp16")) == "no"


@pytest.mark.parametrize("no_half_vae", [False, True])
def test_bf16_run_places_weights_and_vae(tmp_path, no_half_vae):
    model = write_tiny_checkpoints(tmp_path, "sd1")["safetensors"]
    data = write_dreambooth_folder(tmp_path / "data")
    argv = [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--output_dir={tmp_path / 'out'}",
            "--resolution=64", "--network_module=networks.lora", "--mixed_precision=bf16", "--max_train_steps=1"]
    cfg, _ = parse_train_args(argv + (["--no_half_vae"] if no_half_vae else []))
    family = resolve_family(cfg)
    session = _setup(cfg, family, _make_accelerator(cfg))
    comps = session.comps
    assert next(comps.denoiser.parameters()).dtype == torch.bfloat16
    assert next(comps.text_encoders[0].parameters()).dtype == torch.bfloat16
    vae_weight = comps.vae.decoder.conv_out.weight
    reference = family.load(parse_train_args(argv[:-2] + ["--max_train_steps=1"])[0]).vae.decoder.conv_out.weight  # fp32 load
    if no_half_vae:
        assert vae_weight.dtype == torch.float32 and torch.equal(vae_weight, reference)
    else:
        assert vae_weight.dtype == torch.bfloat16 and torch.equal(vae_weight, reference.to(torch.bfloat16))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs as asked on a GPU")
def test_metadata_records_the_precision_that_ran(tmp_path):
    """fp16 without a GPU trains in float32: the file says so (sd-scripts' value for float32 is "no")."""
    from lorakit.training.metadata import RunFacts, training_metadata

    model = write_tiny_checkpoints(tmp_path, "sd1")["safetensors"]
    cfg, _ = parse_train_args([f"--pretrained_model_name_or_path={model}", f"--train_data_dir={tmp_path}",
                               f"--output_dir={tmp_path / 'out'}", "--network_module=networks.lora",
                               "--mixed_precision=fp16", "--resolution=64"])
    facts = RunFacts(num_train_images=1, num_reg_images=0, num_batches_per_epoch=1, num_epochs=1, max_train_steps=1,
                     warmup_steps=0, optimizer="AdamW", seed=0)
    assert training_metadata(cfg, facts)["ss_mixed_precision"] == "no"
