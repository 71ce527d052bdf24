"""The learning signal: a short LoRA run on the held-out concept lowers the held-out denoising loss."""

from __future__ import annotations

import pytest

from lorakit.cli.main import main
from lorakit.toy.demo import base_model_dir, train_arguments
from lorakit.toy.evaluate import denoising_loss, held_out_concept_set, load_with_lora
from lorakit.toy.world import make_dataset


@pytest.mark.skipif(base_model_dir() is None, reason="the pretrained toy base model is not installed")
def test_lora_lowers_held_out_denoising_loss_on_the_concept(tmp_path):
    model = base_model_dir()
    data = make_dataset(tmp_path / "data", 12, concept=True, seed=7, size=64, repeats=1)
    args = train_arguments(model, data, tmp_path / "out", steps=40)
    assert main(["train", *args]) == 0
    held_out = held_out_concept_set(count=12, seed=999)

    base_loss = denoising_loss(*load_with_lora(model, None), held_out)
    lora_loss = denoising_loss(*load_with_lora(model, tmp_path / "out" / "demo_lora.safetensors"), held_out)
    assert lora_loss < base_loss * 0.97, (base_loss, lora_loss)


@pytest.mark.skipif(base_model_dir() is None, reason="the pretrained toy base model is not installed")
def test_finetune_lowers_held_out_denoising_loss_on_the_concept(tmp_path):
    """`lorakit finetune` (the whole U-Net, the demo's options) learns the concept too; the fine-tuned model is a
    diffusers folder like the toy base model."""
    from lorakit.toy.demo import finetune_arguments

    model = base_model_dir()
    data = make_dataset(tmp_path / "data", 12, concept=True, seed=7, size=64, repeats=1)
    assert main(["finetune", *finetune_arguments(model, data, tmp_path / "out", steps=30)]) == 0
    held_out = held_out_concept_set(count=12, seed=999)
    base_loss = denoising_loss(*load_with_lora(model, None), held_out)
    tuned_loss = denoising_loss(*load_with_lora(tmp_path / "out" / "demo_finetune", None), held_out)
    assert tuned_loss < base_loss * 0.97, (base_loss, tuned_loss)
