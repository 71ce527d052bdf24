"""Reading and writing weight files (`.safetensors`, `.ckpt`) with errors a user can act on.

Every failure becomes a `CheckpointError` that names the file and says what is wrong with it, so the CLI can
print one line instead of a traceback. Pickled checkpoints are only ever opened with
`torch.load(weights_only=True)`: a file that needs arbitrary objects unpickled is refused, because unpickling
runs code from the file.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lorakit.atomic import staged_file, staged_folder
from lorakit.errors import CheckpointError
from lorakit.quantized_files import fold_fp8_scales, is_gguf, read_gguf

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_ZIP_MAGIC = b"PK\x03\x04"
# diffusers and transformers serialise each weight file in one buffer before writing it: smaller shards keep a
# saved folder's extra memory to one shard's size instead of a whole component's
MAX_SHARD_SIZE = "2GB"


@dataclass
class LoadedCheckpoint:
    """A state dict read from one file, with the file's string metadata.

    For safetensors, `metadata` is the header's `__metadata__`; for pickled checkpoints it holds the
    top-level string entries beside the weights (e.g. `lorakit_configs`).
    """

    path: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


def read_checkpoint(path: str | os.PathLike[str]) -> LoadedCheckpoint:
    """Read every tensor of a `.safetensors` or pickled (`.ckpt`/`.pt`/`.bin`) file onto the CPU."""
    file = Path(path)
    if not file.exists():
        raise CheckpointError(f"{file}: file not found")
    if file.is_dir():
        raise CheckpointError(f"{file}: is a folder, expected a .safetensors or .ckpt file")
    if is_gguf(file):  # a community-quantized file, dequantized as it is read (quantized_files.py)
        return LoadedCheckpoint(str(file), *read_gguf(file))
    if _looks_like_safetensors(file):
        return _read_safetensors(file)
    return _read_pickled(file)


def _looks_like_safetensors(file: Path) -> bool:
    """Decide the format by suffix, else by the first bytes (a zip or pickle header means torch.save)."""
    suffix = file.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return True
    if suffix in PICKLE_SUFFIXES:
        return False
    return sniff_format(file) not in ("zip", "pickle")


def sniff_format(file: Path) -> str:
    """'safetensors', 'zip' (torch.save), 'pickle' (legacy torch.save) or 'unknown', from the first bytes.

    safetensors is tried first: its 8-byte little-endian header length can start with any byte, 0x80 included
    (pickle's PROTO opcode), so a pickle test first would misread about one safetensors file in 256. A
    safetensors file is recognised by a header length that fits in the file followed by the JSON header's `{`.
    """
    with open(file, "rb") as handle:
        head = handle.read(9)
    size = file.stat().st_size
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    return "unknown"


def _read_safetensors(file: Path) -> LoadedCheckpoint:
    """Tensors are copied out of the memory-mapped file one at a time, so only one copy is ever held."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{file}: not a readable safetensors file, it may be truncated or corrupt ({first_line(exc)})"
        ) from None
    return LoadedCheckpoint(str(file), fold_fp8_scales(state_dict), metadata)


def _read_pickled(file: Path) -> LoadedCheckpoint:
    """Load a torch.save file with weights_only=True and unwrap a Lightning-style `state_dict` entry."""
    if not _has_torch_save_header(file):
        raise CheckpointError(
            f"{file}: not a readable .ckpt/.pt file (no zip or pickle header), it may be corrupt or not a checkpoint"
        )
    try:
        obj = _torch_load_weights_only(file)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler names the class it refused with "GLOBAL"; other errors mean garbage.
        if "global" in str(exc).lower():
            raise CheckpointError(
                f"{file}: this checkpoint stores Python objects besides tensors, and lorakit does not unpickle "
                "arbitrary objects because that can run code from the file. Convert it to .safetensors with a "
                "tool you trust, then pass the .safetensors file."
            ) from None
        from lorakit.safe_load import refusal_message  # torch's own message advises loading the file unsafely

        raise CheckpointError(refusal_message(file, exc)) from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{file}: not a readable .ckpt/.pt file, it may be truncated or corrupt ({first_line(exc)})"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors, found a {type(obj).__name__}")
    weights = obj.get("state_dict", obj)
    if not isinstance(weights, dict):
        raise CheckpointError(f"{file}: its 'state_dict' entry is a {type(weights).__name__}, not a dict of tensors")
    state_dict = {k: v for k, v in weights.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    metadata = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, str)}
    return LoadedCheckpoint(str(file), state_dict, metadata)


def _has_torch_save_header(file: Path) -> bool:
    """torch.save writes a zip archive (torch >= 1.6) or a bare pickle, which starts with the PROTO opcode."""
    return sniff_format(file) in ("zip", "pickle")


def _torch_load_weights_only(file: Path) -> Any:
    """mmap avoids a second in-memory copy of zip-format files; legacy (pre-1.6) files cannot be mapped."""
    with open(file, "rb") as handle:
        is_zip = handle.read(4) == _ZIP_MAGIC
    return torch.load(str(file), map_location="cpu", weights_only=True, mmap=is_zip)


def first_line(exc: BaseException) -> str:
    """An exception's message for a one-line error: its first line, at most 200 characters."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def write_safetensors_atomic(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write a safetensors file via a temporary file in the same folder, so a crash never leaves half a file.

    The tensors are written one at a time (the header first, from their shapes), never serialised into one
    buffer beside them: writing a whole model adds one tensor to the memory it takes, not a second model.
    With `dtype`, floating tensors are cast to it as they are written."""
    def written_dtype(tensor: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype

    if any(written_dtype(v) not in _SAFETENSORS_DTYPES for v in state_dict.values()):
        tensors = {k: v.detach().to(written_dtype(v)).contiguous() for k, v in state_dict.items()}
        _write_atomic(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        return
    layout = {k: (v.shape, written_dtype(v)) for k, v in state_dict.items()}
    pieces = ({k: v.to(written_dtype(v))} for k, v in state_dict.items())
    _write_atomic(Path(path), lambda tmp: write_safetensors_streaming(tmp, layout, pieces, metadata or {}))


def cast_floating(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The floating tensors of `state` in `dtype` (None: unchanged); other tensors as they are."""
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def write_torch_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """torch.save `obj` atomically (same temporary-file-then-rename scheme as the safetensors writer)."""
    _write_atomic(Path(path), lambda tmp: torch.save(obj, str(tmp)))


def _write_atomic(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(target) as tmp:
        write(tmp)


def save_pipeline_atomic(pipeline: Any, path: str | os.PathLike[str]) -> Path:
    """`pipeline.save_pretrained` into a staging folder beside `path`, then renamed into place: a crash never
    leaves a half-written model folder under the final name."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(target) as staging:
        pipeline.save_pretrained(str(staging), safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    return target


def save_model_folder_atomic(model: Any, path: str | os.PathLike[str]) -> Path:
    """One diffusers model's `save_pretrained` folder (config.json and its weights), staged and renamed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(target) as staging:
        model.save_pretrained(str(staging), safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    return target


_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float64: "F64", torch.int16: "I16", torch.int8: "I8",
}


def write_safetensors_streaming(
    path: Path, layout: dict[str, tuple[torch.Size, torch.dtype]], pieces: Iterable[dict[str, torch.Tensor]], metadata: dict[str, str]
) -> None:
    """A safetensors file whose header is written from `layout` first and whose tensors then arrive in pieces
    (in the order of `layout`), so no more than one piece is ever held beside the model."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (shape, dtype) in layout.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    names = iter(layout)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for piece in pieces:
            for name, tensor in piece.items():
                expected = next(names)
                if name != expected or tensor.shape != layout[name][0] or tensor.dtype != layout[name][1]:
                    raise RuntimeError(f"streamed tensor {name} does not match the planned header entry {expected}")
                f.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
