"""The 23 blocks of the SDXL U-Net, numbered over the original SGM paths as sd-scripts numbers them, and its
LoRA Block Weight lists.

`input_blocks_N` is 1 + N, `middle_block_N` 10 + N, `output_blocks_N` 13 + N, `out_` 22, `time_embed`/`label_emb`
0. LBW has one MID slot, OUT0N for output_blocks_N, IN00 for the time/label embeddings and OUT09 for `out`.
"""

from __future__ import annotations

import re

from lorakit.adapters.blocks import LBW_SLOTS, BlockLayout, lbw_slots
from lorakit.families.common.unet_blocks import BLOCK_LAYOUT as SD_BLOCK_LAYOUT

_SGM = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_")
_MID, _OUT00 = LBW_SLOTS.index("MID"), LBW_SLOTS.index("OUT00")


def block_of(name: str) -> int | None:
    """Block index of an SDXL kohya U-Net module name (SGM layout), or None when it is in no block."""
    match = _SGM.match(name)
    if match:
        base = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[match.group(1)]
        return base + int(match.group(2))
    if name.startswith("lora_unet_out_"):
        return 22
    if name.startswith(("lora_unet_time_embed", "lora_unet_label_emb")):
        return 0
    return None


def lbw_slot_of(index: int) -> int:
    if index == 0:  # time_embed / label_emb
        return LBW_SLOTS.index("IN00")
    if index <= 9:  # input_blocks_N
        return index
    if index <= 12:  # middle_block_0..2
        return _MID
    return _OUT00 + (index - 13)  # output_blocks_N -> OUT0N, out_ -> OUT09


def _range(prefix: str, first: int, last: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i:02d}" for i in range(first, last + 1))


BLOCK_LAYOUT = BlockLayout(
    "SDXL", 23, 9, 3, 9, padded=True, block_of=block_of,
    lycoris_block_of=lambda path, kohya_name: block_of(kohya_name),
    lbw_lengths={
        12: lbw_slots("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *_range("OUT", 0, 5)),
        20: lbw_slots("BASE", *_range("IN", 0, 8), "MID", *_range("OUT", 0, 8)),
    },
    lbw_slot_of=lbw_slot_of,
    # users' guides pass SD 1.x's 25 values to lycoris.kohya on SDXL: read with SD's indices over the diffusers paths
    lycoris_alternate=SD_BLOCK_LAYOUT,
)


def block_lr_index(sgm_key: str) -> int:
    """The `--block_lr` block (0..22) of an SGM U-Net weight: time/label embeddings 0, `input_blocks.N` 1+N,
    `middle_block.N` 10+N, `output_blocks.N` 13+N, `out.` 22 (sdxl_train.py's numbering)."""
    head, _, rest = sgm_key.partition(".")
    if head in ("time_embed", "label_emb"):
        return 0
    if head == "out":
        return 22
    offsets = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}
    if head in offsets:
        return offsets[head] + int(rest.split(".", 1)[0])
    raise ValueError(f"no --block_lr block for the U-Net weight {sgm_key!r}")
