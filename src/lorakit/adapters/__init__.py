"""Adapters attached to a frozen base model: LoRA modules, the network that holds them, and their files."""

from __future__ import annotations

from lorakit.adapters.formats import (
    addnet_hashes,
    file_hashes_for_base_model,
    load_lora_file,
    lora_file_name,
    save_lora_file,
    state_dir_name,
)
from lorakit.adapters.lora import LoRAModule, lora_delta_weight, lora_scale
from lorakit.adapters.modelspec import build_modelspec, default_title
from lorakit.adapters.network import LoRANetwork

__all__ = [
    "LoRAModule",
    "LoRANetwork",
    "addnet_hashes",
    "build_modelspec",
    "default_title",
    "file_hashes_for_base_model",
    "load_lora_file",
    "lora_delta_weight",
    "lora_file_name",
    "lora_scale",
    "save_lora_file",
    "state_dir_name",
]
