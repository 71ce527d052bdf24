"""Latents packed into 2×2 patches (one token per patch, channels outermost), as FLUX.1 and Qwen-Image feed
their transformers: pure functions of tensors."""

from __future__ import annotations

import torch

PATCH = 2  # latents are packed into 2x2 patches


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2·W/2, 4C): each 2×2 patch becomes one token, channels outermost."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `height`×`width`."""
    b, _, features = tokens.shape
    c = features // (PATCH * PATCH)
    grid = tokens.view(b, height // PATCH, width // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(b, c, height, width)
