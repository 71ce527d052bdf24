"""Reading a checkpoint's tensor names without loading it, for deciding which family a file belongs to."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from lorakit.quantized_files import gguf_tensor_names, is_gguf


def safetensors_keys(path: str | Path) -> list[str] | None:
    """The tensor names of a `.safetensors` file from its header, or of a GGUF file from its tensor list (None for
    other files or an unreadable one)."""
    source = Path(path)
    if source.is_file() and is_gguf(source):
        try:
            return list(gguf_tensor_names(source))
        except (ImportError, OSError, ValueError):
            return None
    if not source.is_file() or source.suffix.lower() != ".safetensors":
        return None
    try:
        with safe_open(str(source), framework="pt", device="cpu") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, ValueError):
        return None


def class_name(config_file: Path) -> str:
    """The `_class_name` of a diffusers config or model_index file ('' when missing or unreadable)."""
    try:
        return str(json.loads(config_file.read_text(encoding="utf-8")).get("_class_name", ""))
    except (OSError, ValueError):
        return ""
