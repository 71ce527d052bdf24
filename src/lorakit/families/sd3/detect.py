"""Telling an SD3 / SD3.5 model from other checkpoints cheaply, for `--family auto`.

Kept apart from loading.py so the check imports neither diffusers nor transformers: it runs before any model
loads, also for `--dry_run`. For `.safetensors` only the header is read.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

MMDIT_MARKER = "joint_blocks.0.x_block.attn.qkv.weight"  # SAI layout, with or without model.diffusion_model.
SD3_CLASSES = ("StableDiffusion3", "SD3Transformer2DModel")


def keys_are_sd3(keys: list[str]) -> bool:
    return any(k.endswith(MMDIT_MARKER) for k in keys)


def is_sd3_checkpoint(path: str | Path) -> bool:
    """Whether `path` is an SD3/3.5 model: a diffusers folder of StableDiffusion3Pipeline (or a bare
    SD3Transformer2DModel folder), or a `.safetensors` with SAI MMDiT tensor names."""
    source = Path(path)
    if source.is_dir():
        for file in (source / "model_index.json", source / "transformer" / "config.json", source / "config.json"):
            if file.is_file() and any(c in _class_name(file) for c in SD3_CLASSES):
                return True
        return False
    if not source.is_file() or source.suffix.lower() != ".safetensors":
        return False
    try:
        with safe_open(str(source), framework="pt", device="cpu") as handle:
            return keys_are_sd3(list(handle.keys()))
    except (SafetensorError, OSError, ValueError):
        return False


def _class_name(file: Path) -> str:
    try:
        return str(json.loads(file.read_text(encoding="utf-8")).get("_class_name", ""))
    except (OSError, ValueError):
        return ""
