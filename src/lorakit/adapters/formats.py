"""Reading and writing kohya LoRA files (.safetensors, .ckpt, .pt), their hashes and their file names.

Files are written to a temporary name in the destination folder and moved into place with `os.replace`, so a
crash or an error never leaves a half-written LoRA behind. `.ckpt`/`.pt` files are read with
`torch.load(weights_only=True)` only (`lorakit.safe_load`): they are pickles and must never run code.

Hashes follow sd-scripts and the web UIs:
* `sshs_model_hash` / `sshs_legacy_hash` (sd-webui-additional-networks): the state dict is serialised in
  memory with only the `ss_*` metadata; the model hash is the SHA-256 of the tensor data that follows the
  8-byte length and the JSON header, the legacy hash the first 8 hex digits of the SHA-256 of the 64 KiB at
  offset 1 MiB of that serialisation.
* base-model hashes for `ss_sd_model_hash` / `ss_new_sd_model_hash`: A1111's legacy hash (the same 64 KiB
  window of the file itself) and the SHA-256 of the whole file.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import safetensors
import safetensors.torch
import torch

from lorakit.atomic import staged_file
from lorakit.errors import CheckpointError
from lorakit.checkpoint_io import sniff_format

__all__ = [
    "MODEL_FORMATS",
    "addnet_hashes",
    "file_hashes_for_base_model",
    "load_lora_file",
    "lora_file_name",
    "save_lora_file",
    "state_dir_name",
    "tensors_by_module",
]

MODEL_FORMATS = ("safetensors", "ckpt", "pt")
_LEGACY_OFFSET = 0x100000  # 1 MiB
_LEGACY_LENGTH = 0x10000  # 64 KiB
_READ_CHUNK = 1 << 20


# ---------------------------------------------------------------------- hashes


def addnet_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash` of a state dict, as sd-scripts computes them before saving."""
    ss_only = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    data = safetensors.torch.save(dict(tensors), metadata=ss_only)
    (header_len,) = struct.unpack("<Q", data[:8])
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy = hashlib.sha256(data[_LEGACY_OFFSET : _LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}


def file_hashes_for_base_model(path: str | os.PathLike) -> dict[str, str]:
    """`legacy` (A1111: 8 hex of SHA-256 of the 64 KiB at 1 MiB) and `sha256` (whole file, streamed)."""
    path = Path(path)
    whole = hashlib.sha256()
    try:
        with path.open("rb") as f:
            f.seek(_LEGACY_OFFSET)
            legacy = hashlib.sha256(f.read(_LEGACY_LENGTH)).hexdigest()[:8]
            f.seek(0)
            while chunk := f.read(_READ_CHUNK):
                whole.update(chunk)
    except OSError as e:
        raise CheckpointError(f"cannot read model file {path}: {e.strerror or e}") from e
    return {"legacy": legacy, "sha256": whole.hexdigest()}


# ---------------------------------------------------------------------- saving


def _prepared_tensors(state_dict: Mapping[str, torch.Tensor], save_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies; floating tensors (the `.alpha` scalars too) cast to `save_dtype`."""
    prepared = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {key} is {type(value).__name__}, not a tensor")
        if value.is_meta:
            raise ValueError(f"state dict entry {key} is a meta tensor and holds no data")
        tensor = value.detach().to("cpu")
        if save_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(save_dtype)
        # clone so the saved copy never aliases (or shares storage with) live training weights
        prepared[key] = tensor.contiguous().clone()
    return prepared


def _write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temporary file in the same folder, then `os.replace` it over `path`."""
    try:
        with staged_file(path) as tmp, open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from e


def save_lora_file(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    save_dtype: torch.dtype | None = None,
    model_format: str = "safetensors",
) -> dict[str, str]:
    """Write a kohya LoRA file atomically; returns the metadata written (empty for ckpt/pt).

    For safetensors the `sshs_model_hash` and `sshs_legacy_hash` are added to the metadata; ckpt/pt files are
    a plain `torch.save` of the state dict and carry no metadata, as in sd-scripts.
    """
    if model_format not in MODEL_FORMATS:
        raise ValueError(f"model_format must be one of {MODEL_FORMATS}, got {model_format!r}")
    path = Path(path)
    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(value, str):
            raise TypeError(f"metadata value for {key} must be a string, got {type(value).__name__}")
    tensors = _prepared_tensors(state_dict, save_dtype)
    if model_format == "safetensors":
        meta.update(addnet_hashes(tensors, meta))
        data = safetensors.torch.save(tensors, metadata=meta)
        _write_atomically(path, lambda f: f.write(data))
        return meta
    _write_atomically(path, lambda f: torch.save(tensors, f))
    return {}


# ---------------------------------------------------------------------- loading


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return tensors, metadata


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    from lorakit.safe_load import load_plain_data

    loaded = load_plain_data(path)  # tensors and plain data only; anything else is refused by name
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a LoRA state dict")
    bad = [k for k, v in loaded.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{path} is not a LoRA state dict: entry {bad[0]!r} is not a named tensor")
    return loaded


def tensors_by_module(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A LoRA state dict as {module name: {suffix: tensor}} (`lora_unet_x.lora_down.weight` -> x's `lora_down.weight`)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, {})[suffix] = value
    return modules


def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file (.safetensors, .ckpt or .pt, detected from its content); returns (tensors, metadata).

    Raises `CheckpointError` naming the file when it is missing, truncated or not a tensor file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA file not found: {path}")
    kind = sniff_format(path)
    try:
        if kind == "safetensors":
            return _load_safetensors(path)
        if kind in ("zip", "pickle"):
            return _load_torch(path), {}
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    except Exception as e:  # noqa: BLE001 - a damaged file can fail anywhere inside the parsers
        raise CheckpointError(f"{path} is damaged or truncated and cannot be read: {e}") from e
    raise CheckpointError(f"{path} is neither a safetensors file nor a PyTorch checkpoint")


# ---------------------------------------------------------------------- file names


def lora_file_name(output_name: str | None, ext: str, *, epoch: int | None = None, step: int | None = None) -> str:
    """sd-scripts' names: `{name}-{epoch:06d}.ext`, `{name}-step{step:08d}.ext` or `{name}.ext`.

    Without `output_name` the base is `epoch`, `at` or `last` respectively.
    """
    suffix = f".{ext.lstrip('.')}" if ext else ""  # no extension: a folder (a diffusers model)
    return f"{_checkpoint_stem(output_name, epoch, step)}{suffix}"


def state_dir_name(output_name: str | None, *, epoch: int | None = None, step: int | None = None) -> str:
    """The training-state folder beside a saved model: the model's stem plus `-state`."""
    return f"{_checkpoint_stem(output_name, epoch, step)}-state"


def _checkpoint_stem(output_name: str | None, epoch: int | None, step: int | None) -> str:
    if epoch is not None and step is not None:
        raise ValueError("give either epoch or step, not both")
    if epoch is not None:
        return f"{output_name or 'epoch'}-{epoch:06d}"
    if step is not None:
        return f"{output_name or 'at'}-step{step:08d}"
    return output_name or "last"
