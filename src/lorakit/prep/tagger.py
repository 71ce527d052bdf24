"""`lorakit tag`: tag every image of a folder with a WD14-style ONNX tagger (sd-scripts
`finetune/tag_images_by_wd14_tagger.py`).

Writes `<image stem><caption_extension>` beside each image, or, with `--output_path`, one metadata file instead:
JSON `{image path: {"tags", "image_size"}}` (what `lorakit train --in_json` reads) or JSON Lines
`{"image_path", "caption", "image_size"}`. Image paths in the metadata are absolute, so the file works from any
working directory and with any `--train_data_dir`.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorakit.prep.files import caption_path, find_images, write_json, write_jsonl, write_text
from lorakit.prep.loading import iterate_batches
from lorakit.prep.tag_rules import (
    Label, TagOptions, appended_tags, choose_tags, read_selected_tags_csv, read_tag_mapping_json, rewrite_labels,
)
from lorakit.prep.wd14 import TaggerFiles, TaggerModel, load_for_tagging

logger = logging.getLogger("lorakit.prep")


@dataclass(frozen=True)
class TagRequest:
    """Everything `lorakit tag` was asked to do, already checked."""

    train_data_dir: Path
    files: TaggerFiles
    options: TagOptions
    caption_extension: str = ".txt"
    remove_underscore: bool = False
    character_tag_expand: bool = False
    tag_replacements: tuple[tuple[str, str], ...] = ()
    append_tags: bool = False
    output_path: Path | None = None
    recursive: bool = False
    batch_size: int = 1
    workers: int | None = None
    debug: bool = False


@dataclass
class TagReport:
    """What a run did: tags per image (caption order) and how often each tag was written."""

    captions: dict[Path, str] = field(default_factory=dict)
    frequency: Counter = field(default_factory=Counter)


def load_labels(files: TaggerFiles, request: TagRequest) -> list[Label | None]:
    labels = read_tag_mapping_json(files.labels) if files.uses_tag_mapping else read_selected_tags_csv(files.labels)
    return rewrite_labels(labels, request.options.separator, expand_characters=request.character_tag_expand,
                          remove_underscore=request.remove_underscore, replacements=request.tag_replacements)


def _check_label_count(model: TaggerModel, labels: list, files: TaggerFiles) -> None:
    from lorakit.errors import DataError

    count = model.output_count
    if isinstance(count, int) and count > 0 and count != len(labels) and not files.uses_tag_mapping:
        raise DataError(f"tagger model {files.model} has {count} outputs but {files.labels} lists {len(labels)} "
                        "tags; the two files must come from the same model")


def _batch_size(request: TagRequest, model: TaggerModel) -> int:
    """A model exported with a fixed batch size only accepts that size (sd-scripts switches to it, too)."""
    if model.fixed_batch and model.fixed_batch != request.batch_size:
        logger.warning("--batch_size %d: the tagger model takes batches of %d; using %d", request.batch_size,
                       model.fixed_batch, model.fixed_batch)
        return model.fixed_batch
    return request.batch_size


def _rating_floor(request: TagRequest, files: TaggerFiles) -> float:
    """tag_mapping.json models only consider labels above the lowest threshold, ratings included."""
    return min(request.options.thresholds.values()) if files.uses_tag_mapping else 0.0


def _caption_text(image: Path, tags: list[str], request: TagRequest) -> str:
    separator = request.options.separator
    existing = caption_path(image, request.caption_extension)
    if request.append_tags and existing.is_file():
        tags = appended_tags(existing.read_text(encoding="utf-8"), tags, separator)
    return separator.join(tags)


def _write_metadata(path: Path, captions: dict[Path, str], sizes: dict[Path, tuple[int, int]]) -> None:
    if path.suffix.lower() == ".jsonl":
        write_jsonl(path, ({"image_path": str(image.resolve()), "caption": text, "image_size": list(sizes[image])}
                           for image, text in captions.items()))
    else:
        write_json(path, {str(image.resolve()): {"tags": text, "image_size": list(sizes[image])}
                          for image, text in captions.items()})
    logger.info("wrote the tags of %d images to %s", len(captions), path)


def run_tagging(request: TagRequest) -> TagReport:
    """Tag every image; returns the captions written and the tag frequencies."""
    images = find_images(request.train_data_dir, request.recursive)
    logger.info("found %d images in %s", len(images), request.train_data_dir)
    report = TagReport()
    if not images:
        return report
    model = TaggerModel(request.files)
    labels = load_labels(request.files, request)
    _check_label_count(model, labels, request.files)
    sizes: dict[Path, tuple[int, int]] = {}
    prepare = functools.partial(load_for_tagging, size=model.input_size)
    floor = _rating_floor(request, request.files)
    for batch in iterate_batches(images, _batch_size(request, model), prepare, request.workers, "tagging"):
        probabilities = model.probabilities(np.stack([pixels for _, (pixels, _) in batch]))
        for (image, (_, size)), probs in zip(batch, probabilities):
            tags = choose_tags(probs, labels, request.options, by_probability=request.files.uses_tag_mapping,
                               rating_floor=floor)
            report.frequency.update(tags)
            text = _caption_text(image, tags, request)
            report.captions[image], sizes[image] = text, size
            if request.debug:
                logger.info("%s: %s", image, text)
            if request.output_path is None:
                write_text(caption_path(image, request.caption_extension), text + "\n")
    if request.output_path is not None:
        _write_metadata(request.output_path, report.captions, sizes)
    return report


def frequency_lines(frequency: Counter) -> list[str]:
    """`--frequency_tags`: "tag: count", most frequent first (ties in first-seen order)."""
    return ["Tag frequencies:"] + [f"{tag}: {count}" for tag, count in frequency.most_common()]
