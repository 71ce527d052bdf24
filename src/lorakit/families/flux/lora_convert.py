"""FLUX.1 LoRA files: kohya/BFL layout <-> diffusers/PEFT layout, both ways (the converter of
`common/bfl_lora_convert.py` over FLUX.1's layer table: `bfl_keys.lora_targets_by_block` and the embedders)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lorakit.families.common.bfl_lora_convert import BflLoraConverter
from lorakit.families.flux import bfl_keys
from lorakit.families.flux.lora_keys import LORA_LAYOUT as FLUX_LAYOUT

__all__ = ["diffusers_to_kohya", "kohya_to_diffusers"]

TEXT_COMPONENTS = {"lora_te1": "text_encoder", "lora_te3": "text_encoder_2"}


def _layer_table(num_double: int, num_single: int) -> dict[str, tuple[str, ...]]:
    """kohya name -> the diffusers paths (under the transformer) stacked in it, in order."""
    table = {name: parts for name, _, parts, _ in bfl_keys.lora_targets_by_block(num_double, num_single)}
    for group in bfl_keys.EMBEDDER_GROUPS:
        for bfl_path in group:
            table[bfl_keys.embedder_kohya_name(bfl_path)] = (bfl_keys.TOP_LEVEL[bfl_path],)
    return table


CONVERTER = BflLoraConverter(_layer_table, tuple(TEXT_COMPONENTS), FLUX_LAYOUT, "FLUX", t5_prefix="lora_te3")


def kohya_to_diffusers(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, keep_alpha: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A kohya FLUX LoRA as PEFT keys (alpha folded into lora_B, or kept as `.alpha` with `keep_alpha`)."""
    return CONVERTER.kohya_to_diffusers(state, metadata, keep_alpha=keep_alpha)


def diffusers_to_kohya(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A PEFT-layout FLUX LoRA as kohya keys (fused BFL modules); alpha from `.alpha` keys, else rank."""
    return CONVERTER.diffusers_to_kohya(state, metadata)
