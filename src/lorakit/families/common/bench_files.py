"""Helpers for the families' benchmark models (`families/<name>/tiny.py: bench_files`): real-size shapes with
random weights, written once as the single files users train from."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build real-size models directly in `dtype`: half the memory and time of building in fp32 first."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def clean_config(config: dict) -> dict:
    """A transformers/diffusers config without its bookkeeping keys, to build a model from."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "transformers_version", "model_type")}


def single_file(folder: Path, write: Callable[[Path], None]) -> list[str]:
    """Write the model as one checkpoint file unless it is there already; the option that names it."""
    path = folder / "model.safetensors"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        write(path)
    return [f"--pretrained_model_name_or_path={path}"]
