"""Text-encoder output cache files with sd-scripts' names and npz keys, so caches move between the two tools (§9.5).

Path: `<image without extension><suffix>`, one file per image holding its caption's outputs. Each model family
gives its `TextFileFormat`: the suffix (`_te_outputs.npz`, `_sd3_te.npz`, `_flux_te.npz`, …), the output arrays
every file holds, and the switches sd-scripts stores beside them as booleans under the option's own name
(`apply_t5_attn_mask`): a file made with another value is stale, as in sd-scripts.

We add `lorakit_*` keys that sd-scripts ignores: the caption, the text encoders' identity (the base model and
the options naming encoder files) and the other options the outputs depend on (`clip_skip`, the T5 length). A
file is stale when any of them no longer matches; files without them (written by sd-scripts) are checked by
keys and switches only, as sd-scripts checks them, so a changed caption goes unnoticed there.

Outputs are stored as float32 (sd-scripts turns bfloat16 into float32 too); token masks as integers.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.atomic import staged_file

#: the keys lorakit adds to every file it writes (sd-scripts' loaders read only the keys they know)
CAPTION_KEY = "lorakit_caption"
ENCODERS_KEY = "lorakit_encoders"
SETTINGS_KEY = "lorakit_settings"


@dataclass(frozen=True)
class TextFileFormat:
    """A family's text-encoder cache files: name suffix, stored arrays and the options the outputs depend on."""

    suffix: str
    keys: tuple[str, ...]  # output arrays every valid file holds (sd-scripts' names)
    switches: tuple[str, ...] = ()  # options sd-scripts stores as booleans under their own name
    settings: tuple[str, ...] = ()  # other options the outputs depend on (recorded by lorakit only)
    encoder_files: tuple[str, ...] = ()  # options naming text-encoder files of their own (`clip_l`, `t5xxl`)
    # language-model encoders give each caption its own number of tokens: the output named here is the (B, L)
    # mask of real tokens, every output of length L is stored without its padding and padded again per batch
    ragged_mask: str | None = None


@dataclass(frozen=True)
class TextFileRequest:
    """What one file must hold: the caption's outputs, made by these encoders with these options."""

    caption: str
    encoders: str
    settings: str
    switches: tuple[tuple[str, bool], ...]


def text_file_path(image: Path, fmt: TextFileFormat) -> Path:
    """sd-scripts' cache file name for an image's caption outputs."""
    return Path(f"{image.with_suffix('')}{fmt.suffix}")


def text_request(cfg: Any, fmt: TextFileFormat, caption: str) -> TextFileRequest:
    """The request for `caption` under the run's options (the same for training and `lorakit cache`)."""
    encoders = [str(getattr(cfg, "pretrained_model_name_or_path", "") or "")]
    encoders += [f"{name}={getattr(cfg, name)}" for name in fmt.encoder_files if getattr(cfg, name, None)]
    if getattr(cfg, "base_weights", None):  # LoRAs merged into the encoders change their outputs
        encoders.append(f"base_weights={cfg.base_weights}x{getattr(cfg, 'base_weights_multiplier', None)}")
    settings = ";".join(f"{name}={getattr(cfg, name, None)}" for name in fmt.settings)
    switches = tuple((name, bool(getattr(cfg, name, False))) for name in fmt.switches)
    return TextFileRequest(caption, "|".join(encoders), settings, switches)


def _open(path: Path, keys: tuple[str, ...]) -> tuple[set[str], dict[str, np.ndarray]] | None:
    """The array names of an npz file and the arrays among `keys` it holds (npz members load lazily, so the
    other arrays, megabytes for T5's outputs, are not read); None when it is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return set(data.files), {key: data[key] for key in keys if key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def is_valid(path: Path, request: TextFileRequest, fmt: TextFileFormat, skip_check: bool = False) -> bool:
    """Whether `path` holds usable outputs for `request` (the module docstring has the rules)."""
    if not path.is_file():
        return False
    if skip_check:
        return True
    switch_names = tuple(name for name, _ in request.switches)
    opened = _open(path, (*switch_names, CAPTION_KEY, ENCODERS_KEY, SETTINGS_KEY))
    if opened is None:
        return False
    names, stored = opened
    if any(key not in names for key in (*fmt.keys, *switch_names)):
        return False
    if any(bool(stored[name]) != value for name, value in request.switches):
        return False
    expected = {CAPTION_KEY: request.caption, ENCODERS_KEY: request.encoders, SETTINGS_KEY: request.settings}
    return all(str(stored[key]) == value for key, value in expected.items() if key in stored)


def write_text_file(path: Path, request: TextFileRequest, outputs: dict[str, torch.Tensor]) -> None:
    """One caption's outputs (unbatched tensors under sd-scripts' keys) and our keys, written atomically."""
    arrays: dict[str, np.ndarray] = {}
    for key, value in outputs.items():
        value = value.detach().cpu()
        arrays[key] = (value.float() if value.is_floating_point() else value).numpy()
    arrays.update({name: np.array(value) for name, value in request.switches})
    arrays[CAPTION_KEY] = np.array(request.caption)
    arrays[ENCODERS_KEY] = np.array(request.encoders)
    arrays[SETTINGS_KEY] = np.array(request.settings)
    with staged_file(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def read_text_file(path: Path, fmt: TextFileFormat) -> dict[str, torch.Tensor]:
    """The stored outputs as tensors: every array but the switches and our own keys."""
    try:
        with np.load(path, allow_pickle=False) as data:
            skip = {*fmt.switches, CAPTION_KEY, ENCODERS_KEY, SETTINGS_KEY}
            stored = {key: data[key] for key in data.files if key not in skip}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise OSError(f"text-encoder cache {path} cannot be read ({error}); delete it to encode the caption again") from None
    missing = [key for key in fmt.keys if key not in stored]
    if missing:
        raise OSError(f"text-encoder cache {path} has no {', '.join(missing)}; delete it to encode the caption again")
    return {key: torch.from_numpy(np.array(value)) for key, value in stored.items()}
