"""Stability AI's ModelSpec 1.0.1 metadata (`modelspec.*` keys) for LoRA files, as sd-scripts writes it.

The spec (github.com/Stability-AI/ModelSpec) describes a model file with flat string keys in the
safetensors header; web UIs read the title, architecture, resolution and thumbnail from it.
"""

from __future__ import annotations

import base64
import difflib
import mimetypes
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from lorakit import __version__
from lorakit.errors import ConfigError

__all__ = ["EXTRA_KEYS", "SPEC_VERSION", "build_modelspec", "default_title", "thumbnail_data_url"]

SPEC_VERSION = "1.0.1"
# The `--metadata_<x>` options that become `modelspec.<x>` verbatim (thumbnail is converted first).
EXTRA_KEYS = (
    "description",
    "author",
    "license",
    "tags",
    "usage_hint",
    "thumbnail",
    "merged_from",
    "trigger_phrase",
    "preprocessor",
    "is_negative_embedding",
)
_ADAPTER_SUFFIXES = ("/lora", "/textual-inversion", "/controlnet", "/control-net-lllite")


def thumbnail_data_url(value: str) -> str:
    """A `data:` URL as is; otherwise an image file read and encoded as a base64 data URL."""
    if value.startswith("data:"):
        return value
    path = Path(value)
    mime, _ = mimetypes.guess_type(path.name)
    if mime is None or not mime.startswith("image/"):
        raise ConfigError([f"metadata_thumbnail: {path} is not an image file (expected .png, .jpg, .webp, ...)"])
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError([f"metadata_thumbnail: cannot read {path}: {e.strerror or e}"]) from e
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _normalise_extra(extra: Mapping[str, str] | None) -> dict[str, str]:
    """Accept `author` or `metadata_author`; reject unknown keys with a suggestion."""
    result: dict[str, str] = {}
    problems: list[str] = []
    for raw_key, value in (extra or {}).items():
        key = raw_key.removeprefix("metadata_")
        if key not in EXTRA_KEYS:
            close = difflib.get_close_matches(key, EXTRA_KEYS, n=1)
            hint = f" (did you mean metadata_{close[0]}?)" if close else ""
            problems.append(f"unknown ModelSpec metadata key {raw_key}{hint}")
            continue
        if value is not None:
            result[key] = str(value)
    if problems:
        raise ConfigError(problems)
    return result


def build_modelspec(
    architecture: str,
    implementation: str,
    title: str,
    resolution: tuple[int, int] | int,
    prediction_type: str | None,
    *,
    clip_skip: int | None = None,
    timestep_range: tuple[int, int] | None = None,
    extra: Mapping[str, str] | None = None,
    date: datetime | None = None,
    adapter: bool = True,
) -> dict[str, str]:
    """The `modelspec.*` keys of a LoRA file.

    `architecture` is the base model's ModelSpec id (e.g. `stable-diffusion-xl-v1-base`); `/lora` is appended
    unless an adapter suffix is already there. `resolution` is (width, height) or one side. `prediction_type`
    is `epsilon`/`v`, or None to omit it (FLUX). `date` defaults to now (local time, ISO 8601, as sd-scripts).
    `adapter=False`: a whole model (a fine-tuned checkpoint), whose architecture has no suffix.
    """
    if adapter and not architecture.endswith(_ADAPTER_SUFFIXES):
        architecture = f"{architecture}/lora"
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    spec = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": (date or datetime.now()).isoformat(),
        "modelspec.implementation_version": f"lorakit/{__version__}",
    }
    if prediction_type is not None:
        spec["modelspec.prediction_type"] = prediction_type
    if timestep_range is not None:
        low, high = timestep_range
        spec["modelspec.timestep_range"] = f"{low},{high}"
    if clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(clip_skip)
    for key, value in _normalise_extra(extra).items():
        spec[f"modelspec.{key}"] = thumbnail_data_url(value) if key == "thumbnail" else value
    return spec


def default_title(output_name: str | None, metadata_title: str | None = None, when: datetime | None = None) -> str:
    """`--metadata_title`, else the output name, else `LoRA@<unix seconds>` (sd-scripts' fallback chain)."""
    if metadata_title:
        return metadata_title
    if output_name:
        return output_name
    return f"LoRA@{int((when or datetime.now()).timestamp())}"

