"""The latent packing and token positions of Black Forest Labs' FLUX.1-style transformers (FLUX.1, Chroma), and
sd-scripts' split of `--blocks_to_swap` over double and single blocks (pure functions)."""

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


def image_position_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H/2·W/2, 3) ids (0, row, col) per packed token, the RoPE positions FLUX was trained with."""
    rows, cols = height // PATCH, width // PATCH
    ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, 3)


def swapped_blocks(blocks_to_swap: int) -> tuple[int, int]:
    """sd-scripts' split of --blocks_to_swap: N//2 double blocks and twice the rest in single blocks
    (a single block holds about half the weights of a double block)."""
    return blocks_to_swap // 2, (blocks_to_swap - blocks_to_swap // 2) * 2


def max_blocks_to_swap(num_double: int, num_single: int) -> int:
    """The largest N whose split leaves at least two blocks of each kind on the GPU (35 for FLUX.1)."""
    most = 0
    for n in range(1, 2 * (num_double + num_single)):
        double, single = swapped_blocks(n)
        if double <= num_double - 2 and single <= num_single - 2:
            most = n
    return most
