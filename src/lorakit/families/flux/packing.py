"""FLUX.1's latent packing and token positions, and sd-scripts' split of `--blocks_to_swap` (shared with the other
BFL-layout families in `common/bfl_packing.py`)."""

from __future__ import annotations

from lorakit.families.common.bfl_packing import (
    PATCH,
    image_position_ids,
    max_blocks_to_swap,
    pack_latents,
    swapped_blocks,
    unpack_latents,
)

__all__ = ["PATCH", "image_position_ids", "max_blocks_to_swap", "pack_latents", "swapped_blocks", "unpack_latents"]
