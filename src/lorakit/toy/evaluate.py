"""Measures of what a LoRA learned in the toy world: held-out denoising loss and the concept score.

The denoising loss is the training objective evaluated on images and captions the LoRA never saw, with fixed
noise and a fixed grid of timesteps, so two models are compared on exactly the same draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorakit.data.images import to_tensor
from lorakit.families.base import Components
from lorakit.objectives.ddpm import DDPMSchedule, add_noise, training_target
from lorakit.toy.world import render, sample_items

EVAL_TIMESTEPS = (100, 300, 500, 700, 900)


@dataclass(frozen=True)
class HeldOutSet:
    pixels: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    captions: list[str]


def held_out_concept_set(count: int = 16, seed: int = 999, size: int = 64) -> HeldOutSet:
    """Concept images from a seed the demo's training set does not use."""
    items = sample_items(count, concept=True, seed=seed)
    pixels = torch.stack([to_tensor(render(scene, size)) for scene, _ in items])
    return HeldOutSet(pixels, [text for _, text in items])


@torch.no_grad()
def denoising_loss(family, comps: Components, held_out: HeldOutSet, *, seed: int = 0, prediction_type: str = "epsilon") -> float:
    """Mean squared error of the denoiser on `held_out`, averaged over EVAL_TIMESTEPS with fixed noise."""
    schedule = DDPMSchedule.scaled_linear(prediction_type=prediction_type)
    torch.manual_seed(seed)  # the VAE samples its posterior: the same draw for every model compared
    latents = family.encode_images(comps, held_out.pixels).float()
    text = family.encode_text(comps, held_out.captions)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for t in EVAL_TIMESTEPS:
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.full((latents.shape[0],), t, dtype=torch.long)
        noisy = add_noise(schedule, latents, noise, timesteps)
        prediction = family.predict(comps, noisy, timesteps, text, None).float()
        losses.append(torch.mean((prediction - training_target(schedule, latents, noise, timesteps)) ** 2).item())
    return float(np.mean(losses))


def load_with_lora(model_dir: Path, lora_file: Path | None, multiplier: float = 1.0):
    """(family, components) of the model in `model_dir`, with a kohya LoRA file merged when given.

    The family is detected as training detects it, and the file merges as `lorakit sample` merges it (ranks and
    alphas from the file itself).
    """
    from lorakit.families.base import ModelSource
    from lorakit.families.registry import detect_family, get_family
    from lorakit.sampling.apply_lora import LoraMerger, LoraSpec, read_lora_file

    family = get_family(detect_family(str(model_dir)))
    comps = family.load_model(ModelSource(str(model_dir)))
    if lora_file is not None:
        LoraMerger(family, comps).merge(read_lora_file(LoraSpec(str(lora_file), multiplier)))
    return family, comps
