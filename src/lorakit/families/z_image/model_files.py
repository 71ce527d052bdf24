"""Z-Image's transformer as one file: ComfyUI's layout (what `z_image_turbo_bf16.safetensors` holds) or diffusers'
names, with its architecture in the `lorakit.configs` metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lorakit.checkpoint_io import write_safetensors_atomic
from lorakit.families.common.module_io import CONFIGS_METADATA_KEY
from lorakit.families.z_image.comfy_keys import diffusers_to_comfy


def configs_metadata(component: str, config: dict) -> dict[str, str]:
    clean = {k: v for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"}
    return {CONFIGS_METADATA_KEY: json.dumps({component: clean}, default=list)}


def save_transformer_file(transformer: nn.Module, path: str | Path, dtype: torch.dtype | None = None, *,
                          layout: str = "comfy") -> None:
    state = transformer.state_dict()
    if layout == "comfy":
        state = diffusers_to_comfy(state)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    write_safetensors_atomic(state, path, configs_metadata("transformer", transformer.config))
