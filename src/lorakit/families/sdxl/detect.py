"""Telling an SDXL base model from other checkpoints cheaply, for `--family auto`.

Kept apart from loading.py so the check imports neither diffusers nor transformers: it runs before any model
loads, also for `--dry_run`.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from lorakit.checkpoint_io import read_checkpoint
from lorakit.errors import CheckpointError

UNET_LABEL_EMB = "model.diffusion_model.label_emb."
OPENCLIP_G_PREFIX = "conditioner.embedders.1."


def keys_are_sdxl(keys: list[str]) -> bool:
    """SGM files carry the OpenCLIP-G tower under conditioner.embedders.1, or at least the UNet's
    size/pooled embedding (label_emb), which SD 1.x/2.x UNets lack."""
    return any(k.startswith((OPENCLIP_G_PREFIX, UNET_LABEL_EMB)) for k in keys)


def is_sdxl_checkpoint(path: str | Path) -> bool:
    """Whether `path` is an SDXL base model: a diffusers folder with text_encoder_2/ and a text_time UNet,
    or a single file with SGM SDXL tensor names (for .safetensors only the header is read)."""
    source = Path(path)
    if source.is_dir():
        return _is_sdxl_folder(source)
    if not source.is_file():
        return False
    if source.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(source), framework="pt", device="cpu") as handle:
                return keys_are_sdxl(list(handle.keys()))
        except (SafetensorError, OSError, ValueError):
            return False
    try:
        return keys_are_sdxl(list(read_checkpoint(source).state_dict))
    except CheckpointError:
        return False


def _is_sdxl_folder(folder: Path) -> bool:
    unet_config = folder / "unet" / "config.json"
    if not (folder / "text_encoder_2").is_dir() or not unet_config.is_file():
        return False
    try:
        return json.loads(unet_config.read_text(encoding="utf-8")).get("addition_embed_type") == "text_time"
    except (OSError, ValueError):
        return False
