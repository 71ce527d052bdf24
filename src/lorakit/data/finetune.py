"""Fine-tuning datasets: captions and sizes from a `metadata_file` / `--in_json` (inventory §3.4).

The file is JSON `{image_key: {"caption", "tags", "image_size"}}` or JSON Lines with an `image_path` per line.
Relative keys are joined with the subset's `image_dir`; a key without an extension matches any image file
of that name. Caption = caption + caption_separator + tags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.data.buckets import Size
from lorakit.data.discovery import IMAGE_EXTENSIONS
from lorakit.errors import DataError


@dataclass(frozen=True)
class MetadataEntry:
    """One image of a metadata file: its path, the caption it trains with and its size if recorded."""

    path: Path
    caption: str
    size: Size | None
    has_caption: bool


def _load_entries(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(image key, record) pairs from a JSON object or a JSON Lines file."""
    if not path.is_file():
        raise DataError(f"metadata file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            return [(str(row.get("image_path", "")), row) for row in rows]
        data = json.loads(text)
    except UnicodeDecodeError:
        raise DataError(f"metadata file {path} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise DataError(f"metadata file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise DataError(f"metadata file {path} must hold an object {{image: {{caption, tags}}}}")
    return list(data.items())


def resolve_image(key: str, image_dir: Path | None) -> Path | None:
    """The image file a metadata key names, or None when there is none."""
    base = Path(key) if Path(key).is_absolute() or image_dir is None else image_dir / key
    if base.is_file():
        return base
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        candidate = base.with_name(base.name + ext)
        if candidate.is_file():
            return candidate
    return None


def _caption(record: dict[str, Any], separator: str, all_lines: bool) -> str:
    caption = str(record.get("caption") or "").strip()
    tags = str(record.get("tags") or "").strip()
    lines = caption.splitlines() if all_lines else caption.splitlines()[:1]
    lines = [line.strip() for line in lines if line.strip()] or [""]
    if tags:  # with wildcards every caption line gets the tags
        lines = [f"{line}{separator}{tags}" if line else tags for line in lines]
    return "\n".join(lines)


def _size(record: dict[str, Any]) -> Size | None:
    size = record.get("image_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        return int(size[0]), int(size[1])
    return None


def read_metadata_file(path: Path, image_dir: Path | None, separator: str = ",",
                       all_lines: bool = False) -> list[MetadataEntry]:
    """Every image of a metadata file; one `DataError` lists all keys whose image is missing."""
    entries: list[MetadataEntry] = []
    missing: list[str] = []
    for key, record in _load_entries(path):
        if not isinstance(record, dict):
            missing.append(f"{key}: the entry must be an object with caption/tags")
            continue
        image = resolve_image(key, image_dir)
        if image is None:
            where = f" in {image_dir}" if image_dir else ""
            missing.append(f"{key}: no such image{where}")
            continue
        caption = _caption(record, separator, all_lines)
        entries.append(MetadataEntry(image, caption, _size(record), bool(caption)))
    if missing:
        raise DataError(f"metadata file {path}: {len(missing)} bad entr{'y' if len(missing) == 1 else 'ies'}:\n"
                        + "\n".join(f"    {m}" for m in missing))
    return entries
