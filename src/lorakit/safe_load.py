"""Reading `torch.save` files (`.pt`, `.ckpt`, `.bin`, `.pkl`) without ever running code from them.

A pickle can name any Python function and have it called while it loads, so a planted file in a state
folder or a downloaded `.pt` LoRA could run commands on the user's machine. Every such file lorakit reads goes
through `torch.load(weights_only=True)`, which builds only tensors and plain data (dicts, lists, tuples,
numbers, strings); a file that needs anything else is refused with a one-line message naming it and what it
asked for. The message never suggests loading it unsafely: lorakit has no option to do that.

The one extension is `allow_numpy_arrays`: training states written by lorakit before its RNG files held
plain data pickled NumPy's random state as an `ndarray`. NumPy's array reconstruction makes an array from a
shape, a dtype and bytes, and calls nothing else (an object array would still need other classes, which stay
refused), so those old states keep loading.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.errors import CheckpointError

__all__ = ["load_plain_data", "refusal_message", "numpy_array_globals"]

_ZIP_MAGIC = b"PK\x03\x04"
# what torch's weights-only unpickler says when a file asks for more than plain data
_REFUSAL_MARKERS = ("GLOBAL", "Unsupported operand", "Unsupported class", "unsupported", "not an allowed global")


def numpy_array_globals() -> list[Any]:
    """What pickling a NumPy array refers to: its reconstruction function, the array and dtype classes."""
    core = getattr(np, "_core", None) or np.core
    dtype_classes = {type(np.dtype(name)) for name in ("uint32", "int64", "float64", "uint8", "float32")}
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *sorted(dtype_classes, key=lambda c: c.__name__)]


def load_plain_data(path: str | Path, *, allow_numpy_arrays: bool = False, mmap: bool = False) -> Any:
    """`torch.load` restricted to tensors and plain data, onto the CPU; any problem is a one-line
    `CheckpointError` that names the file (refused content, damage, or not a torch.save file at all).

    `mmap` maps a zip-format file's tensors instead of reading them: for checking a file without its cost."""
    file = Path(path)
    try:
        with open(file, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    if not (head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80"):
        raise CheckpointError(f"{file}: not a PyTorch file (no zip or pickle header); it may be damaged")
    allowed = numpy_array_globals() if allow_numpy_arrays else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(str(file), map_location="cpu", weights_only=True, mmap=mmap and head.startswith(_ZIP_MAGIC))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(refusal_message(file, exc)) from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, OSError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as exc:
        raise CheckpointError(f"{file}: cannot be read, it may be truncated or damaged ({_first_line(exc)})") from None


def refusal_message(file: str | Path, exc: BaseException) -> str:
    """One line for a file torch's weights-only unpickler turned down, without torch's advice to load it
    unsafely: what the file asked for, and that lorakit does not run code from data files."""
    text = str(exc)
    if not any(marker in text for marker in _REFUSAL_MARKERS):
        return f"{file}: cannot be read, it may be truncated or damaged ({_torch_detail(text)})"
    wanted = re.search(r"GLOBAL ([\w.]+)", text)
    if wanted:
        return (f"{file}: refused: it asks to build a Python object ({wanted.group(1)}) besides tensors and plain "
                "data; loading it could run code from the file, so lorakit does not load it (use a .safetensors "
                "file, or a state written by lorakit)")
    return (f"{file}: refused: not tensors and plain data as torch.save writes them ({_torch_detail(text)}); "
            "lorakit unpickles nothing else, because that could run code from the file")


def _torch_detail(text: str) -> str:
    """The specific part of torch's message (after 'WeightsUnpickler error:'), without its advice."""
    detail = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line and "torch.load" not in line
              and "safe_globals" not in line and "trusted source" not in line]
    return (useful[0] if useful else "not plain data")[:200]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return _torch_detail(text) if "weights_only" in text else text.splitlines()[0][:200]
