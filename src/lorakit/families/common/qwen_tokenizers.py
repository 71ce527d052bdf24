"""Qwen tokenizers (and Qwen2.5-VL's image processor) from local files, so nothing is fetched from a model hub.

A diffusers folder keeps them in `tokenizer/` (and `processor/`); beside a single text-encoder file they are looked
for in the file's own folder, then in `tokenizer/` and `processor/` there. A missing one is an error naming the
files to provide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.checkpoint_io import first_line
from lorakit.errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
NEIGHBOUR_FOLDERS = ("", "tokenizer", "processor")


def qwen_tokenizer_in(folder: Path) -> Any | None:
    """The Qwen tokenizer saved in `folder` (None when the folder holds no tokenizer files)."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{folder}: cannot read the tokenizer in this folder ({first_line(exc)})") from None


def qwen_image_processor_in(folder: Path) -> Any | None:
    """Qwen2.5-VL's image processor saved in `folder` (`preprocessor_config.json`), or None. The PIL one is
    used: the default needs torchvision, which lorakit does not install (nor transformers' processor class)."""
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        return None
    from transformers import Qwen2VLImageProcessorPil

    try:
        return Qwen2VLImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{folder}: cannot read the image processor in this folder ({first_line(exc)})") from None


def find_beside(anchor: Path, reader, missing: str) -> Any:
    """What `reader` finds in the folder of `anchor` (a file or a folder) or in its tokenizer/ or processor/
    subfolder; else a CheckpointError whose message `missing` says which files to provide."""
    base = anchor if anchor.is_dir() else anchor.parent
    for sub in NEIGHBOUR_FOLDERS:
        found = reader(base / sub if sub else base)
        if found is not None:
            return found
    raise CheckpointError(f"{anchor}: {missing}")
