"""The 25 blocks of the SD 1.x/2.x U-Net (sd-scripts' numbering, inventory §4.3) and its LoRA Block Weight lists,
shared by the U-Net families (SDXL reads LyCORIS lists of 25 values with it).

IN00…IN11, MID, OUT00…OUT11 over diffusers paths: `down_blocks_i_{resnets|attentions}_j` is 1 + 3i + j,
`down_blocks_i_downsamplers` 1 + 3i + 2, `mid_block` 12, `up_blocks_i_{…}_j` 13 + 3i + j, `up_blocks_i_upsamplers`
13 + 3i + 2. Block 0 (conv_in) has no LoRA in `networks.lora`; LyCORIS, which adapts conv_in, counts it as IN00.
"""

from __future__ import annotations

import re

from lorakit.adapters.blocks import LBW_SLOTS, BlockLayout, lbw_slots

_UPDOWN = re.compile(r"_(up|down)_blocks_(\d+)_(resnets|attentions|upsamplers|downsamplers)_(\d+)_")


def block_of(name: str) -> int | None:
    """Block index of an SD 1.x/2.x kohya U-Net module name, or None when it is in no block."""
    match = _UPDOWN.search(name)
    if match:
        side, i, kind, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        within = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + within if side == "down" else 13 + within
    if "_mid_block_" in name:
        return 12
    return None


def lycoris_block_of(path: str, kohya_name: str = "") -> int | None:
    """The block (0…24) of a diffusers U-Net module path (`.` or `_` separated); conv_in is IN00."""
    path = path.replace(".", "_")
    if path.startswith("conv_in"):
        return 0
    return block_of(f"lora_unet_{path}_")  # the kohya pattern ends each index with "_"


def lbw_slot_of(index: int) -> int:
    """LBW has BASE before IN00, so an SD block's slot is its index plus one."""
    return index + 1


def _range(prefix: str, first: int, last: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i:02d}" for i in range(first, last + 1))


BLOCK_LAYOUT = BlockLayout(
    "SD 1.x/2.x", 25, 12, 1, 12, padded=False, block_of=block_of, lycoris_block_of=lycoris_block_of,
    # which of the 26 LBW slots a list of each length fills, in order (sd-scripts' LAYER17/26)
    lbw_lengths={
        17: lbw_slots("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *_range("OUT", 3, 11)),
        26: tuple(range(len(LBW_SLOTS))),
    },
    lbw_slot_of=lbw_slot_of,
)
