"""Fine-tuning metadata files from caption and tag files (sd-scripts `finetune/merge_captions_to_metadata.py`,
`finetune/merge_dd_tags_to_metadata.py`, `finetune/clean_captions_and_tags.py`; inventory §3.4).

The metadata is the JSON object `lorakit train --in_json` reads: `{image key: {"caption": ..., "tags": ...}}`.
The key is the image's file name without extension (found in the subset's image folder by the trainer) or,
with `full_path`, the image's absolute path (sd-scripts writes the path as given; an absolute one works from any
working directory). Merging into an existing file keeps its other keys and entries.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import DataError
from lorakit.prep.clean_rules import clean_caption, clean_tags
from lorakit.prep.files import caption_path, find_images, write_json

logger = logging.getLogger("lorakit.prep")


def read_metadata(path: Path) -> dict[str, dict[str, Any]]:
    """A metadata JSON object; DataError names the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"metadata file {path} cannot be read as JSON: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DataError(f"metadata file {path} must hold an object {{image: {{caption, tags, ...}}}}")
    return data


@dataclass(frozen=True)
class MergeReport:
    merged: int
    without_file: list[Path]


def image_key(image: Path, full_path: bool) -> str:
    return str(image.resolve()) if full_path else image.stem


def merge_text_files(train_data_dir: Path, out_json: Path, key: str, caption_extension: str,
                     in_json: Path | None = None, full_path: bool = False, recursive: bool = False) -> MergeReport:
    """Put each image's caption file text under `key` ("caption" or "tags") of its metadata entry.

    Without `in_json`, an existing `out_json` is read and updated, as sd-scripts does. Images without a caption
    file are listed in the report (sd-scripts stops at the first one).
    """
    source = in_json if in_json is not None else (out_json if out_json.is_file() else None)
    metadata = read_metadata(source) if source is not None else {}
    if source is not None:
        logger.info("updating the entries of %s", source)
    merged, without_file = 0, []
    for image in find_images(train_data_dir, recursive):
        text_file = caption_path(image, caption_extension)
        if not text_file.is_file():
            without_file.append(image)
            continue
        metadata.setdefault(image_key(image, full_path), {})[key] = text_file.read_text(encoding="utf-8").strip()
        merged += 1
    if without_file:
        shown = ", ".join(p.name for p in without_file[:5]) + (" ..." if len(without_file) > 5 else "")
        logger.warning("%d images have no %s file and were left out: %s", len(without_file), caption_extension, shown)
    write_json(out_json, metadata)
    return MergeReport(merged, without_file)


def clean_metadata(in_json: Path, out_json: Path) -> tuple[int, int]:
    """Clean every entry's tags and caption; returns (tag lists changed, captions changed)."""
    metadata = read_metadata(in_json)
    changed = {"tags": 0, "caption": 0}
    lacking: dict[str, list[str]] = {"tags": [], "caption": []}
    for key, entry in metadata.items():
        for field, clean in (("tags", clean_tags), ("caption", clean_caption)):
            if entry.get(field) is None:
                lacking[field].append(key)
                continue
            cleaned = clean(str(entry[field]))
            changed[field] += cleaned != entry[field]
            entry[field] = cleaned
    for field, keys in lacking.items():
        if keys:
            logger.warning("%d entries have no %s (left as they are), e.g. %s", len(keys), field, keys[0])
    write_json(out_json, metadata)
    return changed["tags"], changed["caption"]
