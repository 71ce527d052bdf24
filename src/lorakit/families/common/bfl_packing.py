"""The token positions of Black Forest Labs' FLUX.1-style transformers (FLUX.1, Chroma), their latent packing
(`common/packing.py`, which Qwen-Image shares), and sd-scripts' split of `--blocks_to_swap` over double and
single blocks (pure functions)."""

from __future__ import annotations

import torch

from lorakit.families.common.packing import PATCH, pack_latents, unpack_latents

__all__ = ["PATCH", "image_position_ids", "max_blocks_to_swap", "pack_latents", "swapped_blocks", "unpack_latents"]


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
