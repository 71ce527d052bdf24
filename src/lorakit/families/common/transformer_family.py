"""Pieces the flow-matching transformer families (FLUX, SD3) share: text-encoder LoRA parents, latents
normalised as (z − shift)·scale, and the `--blocks_to_swap` notice."""

from __future__ import annotations

import logging

import torch

from lorakit.families.base import Components

log = logging.getLogger("lorakit")

CLIP_PARENTS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
T5_PARENTS = ("T5Attention", "T5DenseGatedActDense")


class ShiftScaleLatents:
    """encode_images/decode_latents for VAEs whose config has both shift_factor and scaling_factor."""

    def encode_images(self, comps: Components, images: torch.Tensor) -> torch.Tensor:
        vae = comps.vae
        latents = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample()
        latents = torch.nan_to_num(latents, nan=0.0)
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def decode_latents(self, comps: Components, latents: torch.Tensor) -> torch.Tensor:
        vae = comps.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor).sample


def warn_block_swap_not_done(swap: int) -> None:
    """An accepted --blocks_to_swap only saves GPU memory, and the swap itself is not implemented yet."""
    if torch.cuda.is_available():
        log.warning("--blocks_to_swap %d: block swapping is not implemented yet; every block stays on the GPU", swap)
    else:
        log.warning("--blocks_to_swap %d: accepted; it only saves GPU memory, and this run uses the CPU", swap)
