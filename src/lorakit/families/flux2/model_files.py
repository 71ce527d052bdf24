"""FLUX.2 [klein] files as the LoRA tools read and write them: the transformer alone (its LoRAs have no text-encoder
modules), written back in BFL names, streamed one block at a time, or under diffusers' names, with its
architecture in the `lorakit.configs` metadata."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorakit.checkpoint_io import write_safetensors_atomic
from lorakit.families.common.bfl_parts import (
    cast_state,
    configs_metadata,
    save_bfl_transformer,
)
from lorakit.families.flux2 import bfl_keys


def save_transformer_file(transformer: nn.Module, path: str | Path, dtype: torch.dtype | None = None, *, layout: str = "bfl") -> None:
    if layout == "diffusers":
        write_safetensors_atomic(cast_state(transformer.state_dict(), dtype), path, configs_metadata("transformer", transformer.config))
        return
    save_bfl_transformer(transformer, path, bfl_keys.diffusers_to_bfl, dtype)
