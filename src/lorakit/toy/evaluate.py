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
    """(family, components) of an SD-family model, with a kohya LoRA file merged when given.

    Ranks and alphas come from the file itself, so any LoRA/LoCon file made for this model can be applied.
    """
    from dataclasses import replace
    from types import SimpleNamespace

    from lorakit.adapters.formats import load_lora_file
    from lorakit.adapters.network import LoRANetwork
    from lorakit.families.sd.family import StableDiffusionFamily
    from lorakit.families.sd.loading import load_sd_components

    family = StableDiffusionFamily()
    comps = load_sd_components(str(model_dir), v2=False, v_parameterization=False)
    if lora_file is None:
        return family, comps
    state, _ = load_lora_file(lora_file)
    every_layer = SimpleNamespace(
        network_dim=1, network_alpha=1.0, network_args=["conv_dim=1"], network_kwargs=lambda: {"conv_dim": "1"},
        network_train_unet_only=False, network_train_text_encoder_only=False,
    )
    targets = [
        replace(t, rank=state[f"{t.name}.lora_down.weight"].shape[0])
        for t in family.adapter_targets(comps, every_layer)
        if f"{t.name}.lora_down.weight" in state
    ]
    network = LoRANetwork(targets)
    network.load_kohya_state_dict(state, source=str(lora_file))
    network.set_multiplier(multiplier)
    network.merge_to_base()
    return family, comps
