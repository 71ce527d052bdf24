"""Building a `TrainDataset` from the options: read every subset, check every file, choose buckets.

All problems (unreadable images, bad caption files, masks missing or of the wrong size, images missing from
a metadata file) are collected and raised together in one `DataError`, before any model loads. Every image is
decoded once (`lorakit.data.verify`, remembered between starts), so a truncated file cannot stop a run
mid-way; with `--skip_bad_images` such files are left out with one warning that lists them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.data.buckets import BucketChoice, BucketManager, Size, adjust_bucket_limits
from lorakit.data.captions import tag_counts
from lorakit.data.dataset import ImageEntry, TrainDataset
from lorakit.data.dataset_config import plan_datasets
from lorakit.data.discovery import ImageRecord, collect_images, face_box_from_name, missing_caption_message
from lorakit.data.finetune import read_metadata_file
from lorakit.data.holdout import TRAINING, VALIDATION, split_items
from lorakit.data.images import image_size
from lorakit.data.info_cache import read_info_cache, write_info_cache
from lorakit.data.conditioning import ConditioningUse, check_conditioning_size, conditioning_files
from lorakit.data.specs import DatasetSpec, SubsetSpec
from lorakit.data.verify import bad_images
from lorakit.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class _Part:
    """Build-time state of one dataset (one resolution / batch-size group)."""

    spec: DatasetSpec
    manager: BucketManager
    subset_indices: list[int]
    image_counts: dict[int, int]  # subset index -> number of image files
    num_train_images: int
    num_reg_images: int
    tag_frequency: dict[str, dict[str, int]]


@dataclass
class _SubsetImages:
    """What reading one subset found: records with sizes and masks, and the problems."""

    records: list[ImageRecord]
    sizes: list[Size]
    conditioning: dict[Path, Path]  # image -> its conditioning image
    problems: list[str]
    skipped: list[str]  # bad files left out with --skip_bad_images


def balance_regularisation(train_count: int, reg_repeats: list[int]) -> list[int]:
    """Effective repeats of each regularisation image so reg samples match the training samples.

    sd-scripts' rule: a first pass registers reg images with their own repeats until the running count
    reaches `train_count`; later passes add one repeat per image, cyclically, until it is reached. Images not
    reached in the first pass get 0 (they are never used).
    """
    effective = [0] * len(reg_repeats)
    if not reg_repeats or train_count <= 0:
        return effective
    # the rule in closed form: a loop of one repeat at a time would take 10^9 turns for a folder 1000000000_x
    count = 0
    for i, repeats in enumerate(reg_repeats):
        effective[i] = repeats
        count += repeats
        if count >= train_count:
            return effective
    rounds, extra = divmod(train_count - count, len(reg_repeats))
    return [value + rounds + (1 if i < extra else 0) for i, value in enumerate(effective)]


def _check_bucket_limits(spec: DatasetSpec, where: str) -> tuple[int, int]:
    """Rounded bucket limits; a resolution outside them, or a minimum below one step (buckets of zero width), is a
    `DataError`."""
    if spec.enable_bucket and not spec.bucket_no_upscale and spec.min_bucket_reso < spec.bucket_reso_steps:
        raise DataError(f"{where}: min_bucket_reso {spec.min_bucket_reso} is below bucket_reso_steps "
                        f"{spec.bucket_reso_steps}: a bucket side is at least one step; raise --min_bucket_reso or "
                        "lower --bucket_reso_steps")
    low, high = adjust_bucket_limits(spec.min_bucket_reso, spec.max_bucket_reso, spec.bucket_reso_steps)
    if spec.enable_bucket and not spec.bucket_no_upscale:
        if min(spec.resolution) < low or max(spec.resolution) > high:
            raise DataError(f"{where}: resolution {spec.resolution[0]}x{spec.resolution[1]} must lie within "
                            f"min_bucket_reso {low} and max_bucket_reso {high}")
    return low, high


def _records(subset: SubsetSpec) -> tuple[list[ImageRecord], dict[Path, Size]]:
    """Image records of a subset, plus any sizes known without opening the images."""
    if subset.metadata_file is not None:
        entries = read_metadata_file(subset.metadata_file, subset.image_dir, subset.caption_separator,
                                     subset.enable_wildcard)
        return ([ImageRecord(e.path, e.caption, e.has_caption) for e in entries],
                {e.path: e.size for e in entries if e.size})
    if subset.cache_info and subset.image_dir is not None and subset.image_dir.is_dir():
        cached = read_info_cache(subset.image_dir)
        if cached:  # listed images found in the cache skip their caption file and header reads
            return _records_with_info_cache(subset, cached)
    records = collect_images(subset.image_dir, subset.caption_extension, subset.class_tokens, subset.enable_wildcard)
    return records, {}


def _records_with_info_cache(subset: SubsetSpec, cached: dict[str, tuple[str, Size]]
                             ) -> tuple[list[ImageRecord], dict[Path, Size]]:
    records = collect_images(subset.image_dir, subset.caption_extension, subset.class_tokens,
                             subset.enable_wildcard, {name: caption for name, (caption, _) in cached.items()})
    return records, {r.path: cached[str(r.path)][1] for r in records if str(r.path) in cached}


def _read_subset(subset: SubsetSpec, skip_bad: bool = False) -> _SubsetImages:
    """Images, sizes, conditioning images and problems of one subset; bad image files are left out when
    `skip_bad` (an image whose conditioning image cannot be read goes with it)."""
    records, known = _records(subset)
    sizes, unreadable, kept = [], [], []
    for record in records:
        try:
            sizes.append(known.get(record.path) or image_size(record.path))
            kept.append(record)
        except DataError as err:
            unreadable.append(str(err))
    pairs: dict[Path, Path] = {}
    problems: list[str] = []
    if subset.conditioning_data_dir is not None:
        pairs, pair_problems = conditioning_files([r.path for r in kept], subset.conditioning_data_dir)
        problems += pair_problems
    bad = bad_images([r.path for r in kept] + [pairs[r.path] for r in kept if r.path in pairs])
    unreadable += [bad[p] for p in sorted(bad)]
    good = [i for i, r in enumerate(kept) if r.path not in bad and pairs.get(r.path) not in bad]
    kept, sizes = [kept[i] for i in good], [sizes[i] for i in good]
    problems += [p for r, s in zip(kept, sizes) if r.path in pairs
                 if (p := check_conditioning_size(pairs[r.path], r.path, s))]
    skipped = unreadable if skip_bad else []
    problems += [] if skip_bad else unreadable
    if subset.cache_info and subset.metadata_file is None and kept and not problems:
        write_info_cache(subset.image_dir, {str(r.path): (r.caption, s) for r, s in zip(kept, sizes)})
    return _SubsetImages(kept, sizes, pairs, problems, skipped)


def build_train_dataset(cfg: Any, seed: int | None = None,
                        conditioning: ConditioningUse = ConditioningUse.MASK) -> TrainDataset:
    """Find, check and bucket every image named by `cfg` (sd-scripts option names).

    `conditioning` says what the run's training type does with conditioning images (`data/conditioning.py`).
    All unreadable images, bad caption files and bad or missing conditioning images are reported together in
    one `DataError`. With a validation split the held-out images are left out, and the dataset's `validation`
    holds them.
    """
    dataset = _build(cfg, seed, conditioning, TRAINING)
    if any(part.spec.validation_split for part in dataset.parts):
        dataset.validation = _build(cfg, seed, conditioning, VALIDATION)
        if dataset.validation is not None:
            logger.info("validation: %d held-out image(s)", len(dataset.validation.images))
    return dataset


def _build(cfg: Any, seed: int | None, conditioning: ConditioningUse, role: str) -> TrainDataset | None:
    """The training dataset, or (role VALIDATION) the held-out images, None when there are none."""
    plan = plan_datasets(cfg, conditioning)
    seed = int(seed if seed is not None else getattr(cfg, "seed", None) or 0)
    subsets: list[SubsetSpec] = []
    images: list[ImageEntry] = []
    parts: list[_Part] = []
    problems: list[str] = []
    skipped: list[str] = []
    missing: list[tuple[Path, int]] = []
    skip_bad = bool(getattr(cfg, "skip_bad_images", False))
    for index, spec in enumerate(plan.datasets):
        where = f"dataset config {plan.config_file} [[datasets]] #{index + 1}" if plan.config_file else "the options"
        parts.append(_build_part(index, spec, where, subsets, images, problems, missing, (skip_bad, skipped),
                                 (role, seed)))
    if role == VALIDATION:
        images = [e for e in images if e.repeats > 0]
        return TrainDataset(subsets, images, parts, seed, 1.0, plan.from_config_file,
                            conditioning_masks=bool(getattr(cfg, "masked_loss", False))) if images else None
    if skipped:
        logger.warning("--skip_bad_images: left out %d image(s) that cannot be read:\n%s", len(skipped),
                       "\n".join(f"  - {p}" for p in skipped))
    if problems:
        hint = "" if skip_bad or not any(p.startswith("image ") for p in problems) else \
            " (--skip_bad_images trains without the images that cannot be read)"
        raise DataError(f"{len(problems)} problem(s) with the training images{hint}:\n"
                        + "\n".join(f"  - {p}" for p in problems))
    message = missing_caption_message(missing, "/".join(sorted({s.caption_extension for s in subsets})))
    if message:
        logger.warning(message)
    if not any(e.repeats for e in images):
        source = plan.config_file or getattr(cfg, "train_data_dir", None)
        raise DataError(f"no training images found in {source}; put .png/.jpg/.jpeg/.webp/.bmp images "
                        "in a subfolder named like 10_mychar")
    images = [e for e in images if e.repeats > 0]
    prior = getattr(cfg, "prior_loss_weight", None)
    dataset = TrainDataset(subsets, images, parts, seed, 1.0 if prior is None else float(prior),
                           plan.from_config_file, conditioning_masks=bool(getattr(cfg, "masked_loss", False)))
    dataset.set_training_length(getattr(cfg, "max_train_steps", None) or 0,
                                getattr(cfg, "gradient_accumulation_steps", None) or 1)
    return dataset


def _build_part(index: int, spec: DatasetSpec, where: str, subsets: list[SubsetSpec], images: list[ImageEntry],
                problems: list[str], missing: list[tuple[Path, int]], skipping: tuple[bool, list[str]],
                split: tuple[str, int] = (TRAINING, 0)) -> _Part:
    """Read one dataset's subsets (the `split` side of a validation split: role and run seed), balance its
    regularisation images and choose buckets."""
    low, high = _check_bucket_limits(spec, where)
    manager = BucketManager(spec.resolution, spec.enable_bucket, spec.bucket_no_upscale, low, high,
                            spec.bucket_reso_steps)
    part = _Part(spec, manager, [], {}, 0, 0, {})
    reg_ids: list[int] = []
    validating = split[0] == VALIDATION
    for subset in spec.subsets if spec.validation_split or not validating else ():
        try:
            found = _split(_read_subset(subset, skipping[0]), subset, spec, split)
        except DataError as err:
            problems.append(str(err))
            continue
        problems += found.problems
        skipping[1].extend(found.skipped)
        subset_index = len(subsets)
        subsets.append(subset)
        part.subset_indices.append(subset_index)
        part.image_counts[subset_index] = len(found.records)
        if not found.records:
            if not validating:
                logger.warning("no images in %s; it is skipped", subset.source)
            continue
        missing.append((subset.source, sum(1 for r in found.records if not r.has_caption_file)))
        _merge_tags(part.tag_frequency, _tag_key(subset), [r.caption for r in found.records])
        repeats = 1 if validating else subset.num_repeats
        if subset.is_reg:
            part.num_reg_images += repeats * len(found.records)
        else:
            part.num_train_images += repeats * len(found.records)
        for record, size in zip(found.records, found.sizes):
            choice = _choose_bucket(manager, record.path, size, problems)
            if subset.is_reg:
                reg_ids.append(len(images))
            images.append(ImageEntry(record.path, record.caption, subset_index, index, size, choice,
                                     repeats, found.conditioning.get(record.path),
                                     face_box_from_name(record.path) if subset.face_crop_aug_range else None))
    _apply_reg_balance(part, images, reg_ids)
    return part


def _split(found: _SubsetImages, subset: SubsetSpec, spec: DatasetSpec, split: tuple[str, int]) -> _SubsetImages:
    """The images of one subset on the `split` side of the dataset's validation split (`data/holdout.py`)."""
    role, run_seed = split
    if not spec.validation_split or (subset.is_reg and role == TRAINING):
        return found
    if subset.is_reg:
        return _SubsetImages([], [], {}, found.problems, found.skipped)
    seed = spec.validation_seed if spec.validation_seed is not None else run_seed
    kept = split_items(list(zip(found.records, found.sizes)), spec.validation_split, seed, role)
    return _SubsetImages([r for r, _ in kept], [s for _, s in kept], found.conditioning, found.problems,
                         found.skipped)


def _tag_key(subset: SubsetSpec) -> str:
    """The name tag counts are filed under: the folder name, or the metadata file's for fine-tuning."""
    return subset.metadata_file.name if subset.metadata_file is not None else subset.source.name


def _choose_bucket(manager: BucketManager, path: Path, size: Size, problems: list[str]) -> BucketChoice:
    choice = manager.select(*size)
    if min(choice.bucket) <= 0:
        problems.append(f"image {path} ({size[0]}x{size[1]}) is smaller than bucket_reso_steps "
                        f"{manager.steps}; enlarge it or remove it")
    return choice


def _apply_reg_balance(part: _Part, images: list[ImageEntry], reg_ids: list[int]) -> None:
    """Set the effective repeats of regularisation images (sd-scripts' balancing rule)."""
    if not reg_ids:
        return
    if part.num_train_images < part.num_reg_images:
        logger.warning("more regularisation images (%d) than training images (%d): some are not used",
                       part.num_reg_images, part.num_train_images)
    repeats = balance_regularisation(part.num_train_images, [images[i].repeats for i in reg_ids])
    for image_id, effective in zip(reg_ids, repeats):
        images[image_id].repeats = effective


def _merge_tags(frequency: dict[str, dict[str, int]], folder_name: str, captions: list[str]) -> None:
    """Add a folder's tag counts into the dataset's tag frequency (same folder names merge)."""
    target = frequency.setdefault(folder_name, {})
    for tag, n in tag_counts(captions).items():
        target[tag] = target.get(tag, 0) + n
