"""FLUX.2's latents and token positions (pure functions), as its pipeline and musubi-tuner build them.

The autoencoder's 32-channel latent is cut into 2×2 patches (128 channels, channel-major: c·4 + 2·row + col) and
normalised per patched channel by the autoencoder's BatchNorm statistics. lorakit keeps latents at the VAE's
resolution (patches folded back), which the flow objective noises element by element exactly as the patched
tensor, and which fits the latent cache files of every family; `predict` patches and packs them. Every token has
a 4-axis position (t, h, w, l): image tokens (0, row, col, 0), text tokens (0, 0, 0, index).
"""

from __future__ import annotations

import torch

PATCH = 2


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(b, c * PATCH * PATCH, h // PATCH, w // PATCH)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `patchify`."""
    b, c, h, w = latents.shape
    grid = latents.reshape(b, c // (PATCH * PATCH), PATCH, PATCH, h, w).permute(0, 1, 4, 2, 5, 3)
    return grid.reshape(b, c // (PATCH * PATCH), h * PATCH, w * PATCH)


def bn_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and standard deviation the autoencoder normalises patched latents with, shaped (1, 4C, 1, 1)."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents at the VAE's resolution -> (B, H/2·W/2, 4C) tokens."""
    patched = patchify(latents)
    b, c, h, w = patched.shape
    return patched.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack` for latents of `height`×`width`."""
    b, _, c = tokens.shape
    return unpatchify(tokens.permute(0, 2, 1).reshape(b, c, height // PATCH, width // PATCH))


def image_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(H/2·W/2, 4) positions (0, row, col, 0) of the packed tokens of a latent of `height`×`width`."""
    rows, cols = height // PATCH, width // PATCH
    return torch.cartesian_prod(torch.arange(1), torch.arange(rows), torch.arange(cols), torch.arange(1)).to(device)


def text_ids(length: int, device: torch.device) -> torch.Tensor:
    """(L, 4) positions (0, 0, 0, index) of the text tokens."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length)).to(device)
