"""Chroma files as the LoRA tools read and write them: the transformer (`--pretrained_model_name_or_path`) and,
only when a LoRA has T5 modules, `--t5xxl`; each written back in the layout it came in (the transformer in the
original BFL names, streamed one block at a time; T5 in the transformers layout), with its architecture in the
`lorakit.configs` metadata."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorakit.checkpoint_io import write_safetensors_atomic
from lorakit.families.base import Components
from lorakit.families.chroma import bfl_keys
from lorakit.families.chroma.loading import load_transformer_alone
from lorakit.families.common.bfl_parts import (
    cast_state,
    configs_metadata,
    load_t5_file,
    save_bfl_transformer,
)


def load_chroma_parts(path: str, *, t5xxl: str | None = None, dtype: torch.dtype = torch.float32) -> Components:
    """The transformer and, when given, T5 (None otherwise); no autoencoder, no tokenizer."""
    transformer = load_transformer_alone(path, dtype).eval()
    t5 = load_t5_file(Path(t5xxl), dtype).eval() if t5xxl else None
    return Components(transformer, None, [t5], [], {"source": path})


def save_transformer_file(transformer: nn.Module, path: str | Path, dtype: torch.dtype | None = None, *, layout: str = "bfl") -> None:
    """The transformer as one `.safetensors`: the original layout (`Chroma1-HD.safetensors`), or diffusers' names."""
    if layout == "diffusers":
        write_safetensors_atomic(cast_state(transformer.state_dict(), dtype), path, configs_metadata("transformer", transformer.config))
        return
    save_bfl_transformer(transformer, path, bfl_keys.diffusers_to_bfl, dtype)
