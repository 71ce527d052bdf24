"""Finding the images of a dataset folder and writing the text files beside them.

sd-scripts' preparation scripts collect images with the training extensions (either case), sorted, from one
folder or recursively; the caption file of `a/b.png` is `a/b` + caption extension. Every file written here goes
through a temporary name (lorakit.atomic), so an interrupted run leaves each caption either old or new.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

from lorakit.atomic import staged_file
from lorakit.data.discovery import IMAGE_EXTENSIONS

logger = logging.getLogger("lorakit.prep")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def find_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (and its subfolders with `recursive`), sorted by path."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(path for path in candidates if is_image_file(path))


def caption_path(image: Path, extension: str) -> Path:
    """`dir/name.png` -> `dir/name<extension>`; the extension may be any suffix such as `.txt` or `_tags.txt`."""
    return image.with_name(image.stem + extension)


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 text under its final name only once complete."""
    with staged_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    """A JSON object, indented and UTF-8 (non-ASCII characters kept readable)."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def one_line(text: str) -> str:
    """A caption on one line: the trainer reads only a caption file's first line (without wildcards)."""
    return " ".join(text.split())


def warn_skipped(path: Path, reason: str) -> None:
    logger.warning("skipped %s: %s", path, reason)
