"""Qwen-Image files as the LoRA tools read and write them: the transformer alone, in the single-file layout ComfyUI
and musubi-tuner load (diffusers' names), with its architecture in the `lorakit.configs` metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lorakit.checkpoint_io import write_safetensors_atomic
from lorakit.errors import CheckpointError
from lorakit.families.base import Components
from lorakit.families.common.module_io import CONFIGS_METADATA_KEY, from_pretrained


def configs_metadata(component: str, config: dict) -> dict[str, str]:
    clean = {k: v for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"}
    return {CONFIGS_METADATA_KEY: json.dumps({component: clean}, default=list)}


def save_transformer_file(transformer: nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> None:
    state = transformer.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    write_safetensors_atomic(state, path, configs_metadata("transformer", transformer.config))


def load_transformer_alone(path: str, dtype: torch.dtype, edit: bool) -> Components:
    """Only the transformer: of a single file, or of a diffusers folder (the pipeline folder or its transformer/)."""
    from diffusers import QwenImageTransformer2DModel

    from lorakit.families.qwen_image.detect import pipeline_is_edit
    from lorakit.families.qwen_image.loading import load_transformer_file

    source = Path(path)
    if source.is_file():
        transformer = load_transformer_file(source, dtype)
    else:
        sub = "transformer" if (source / "transformer" / "config.json").is_file() else ""
        if not (source / sub / "config.json").is_file():
            raise CheckpointError(f"{path}: not a diffusers Qwen-Image transformer folder (no config.json, no transformer/config.json)")
        transformer = from_pretrained(QwenImageTransformer2DModel, source, sub, what="Qwen-Image transformer", torch_dtype=dtype)
        edit = edit or pipeline_is_edit(source)
    return Components(transformer.eval(), None, [None], [], {"source": path, "edit": edit, "image_processor": None})
