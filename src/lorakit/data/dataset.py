"""The training dataset: images grouped into buckets, pre-formed batches, per-epoch shuffling, latent cache.

Batches are formed here, within one bucket each, and the DataLoader only fetches them (no collation). Each
epoch's batch list comes from `random.Random(seed + epoch)`; each batch carries its own seed for flips,
random crops and caption shuffling, so results do not depend on the number of worker processes. The
loader's sampler hands whole batch plans to the workers, so persistent workers never see a stale epoch.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from lorakit.data.batch import Batch
from lorakit.data.buckets import BucketChoice, BucketManager, Size, adjust_bucket_limits
from lorakit.data.captions import process_caption, tag_counts
from lorakit.data.dataset_config import plan_datasets
from lorakit.data.discovery import ImageRecord, collect_images, missing_caption_message
from lorakit.data.images import fit_image, image_size, load_for_bucket, load_image, sdxl_crop_top_left, to_tensor
from lorakit.data.specs import DatasetSpec, SubsetSpec
from lorakit.data.summary import BucketRow, DatasetPartSummary, DatasetSummary, SubsetRow
from lorakit.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class ImageEntry:
    """One distinct image in the dataset and where it goes."""

    path: Path
    caption: str
    subset_index: int
    dataset_index: int
    original_size: Size  # (width, height)
    choice: BucketChoice
    repeats: int  # after regularisation balancing


@dataclass(frozen=True)
class BatchPlan:
    """One pre-formed batch: indices into `TrainDataset.images` from one bucket, and its augmentation seed."""

    bucket: Size
    image_ids: tuple[int, ...]
    seed: int


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


def balance_regularisation(train_count: int, reg_repeats: list[int]) -> list[int]:
    """Effective repeats of each regularisation image so reg samples match the training samples.

    sd-scripts' rule: a first pass registers reg images with their own repeats until the running count
    reaches `train_count`; later passes add one repeat per image, cyclically, until it is reached. Images not
    reached in the first pass get 0 (they are never used).
    """
    effective = [0] * len(reg_repeats)
    if not reg_repeats or train_count <= 0:
        return effective
    count, first_pass = 0, True
    while count < train_count:
        for i, repeats in enumerate(reg_repeats):
            if first_pass:
                effective[i] = repeats
                count += repeats
            else:
                effective[i] += 1
                count += 1
            if count >= train_count:
                break
        first_pass = False
    return effective


def _check_bucket_limits(spec: DatasetSpec, where: str) -> tuple[int, int]:
    """Rounded bucket limits; a resolution outside them is a `DataError`."""
    low, high = adjust_bucket_limits(spec.min_bucket_reso, spec.max_bucket_reso, spec.bucket_reso_steps)
    if spec.enable_bucket and not spec.bucket_no_upscale:
        if min(spec.resolution) < low or max(spec.resolution) > high:
            raise DataError(f"{where}: resolution {spec.resolution[0]}x{spec.resolution[1]} must lie within "
                            f"min_bucket_reso {low} and max_bucket_reso {high}")
    return low, high


def _read_subset(subset: SubsetSpec) -> tuple[list[ImageRecord], list[Size], list[str]]:
    """Images, sizes and problems (bad images) of one folder."""
    records = collect_images(subset.image_dir, subset.caption_extension, subset.class_tokens)
    sizes, problems = [], []
    for record in records:
        try:
            sizes.append(image_size(record.path))
        except DataError as err:
            problems.append(str(err))
    return records, sizes, problems


class TrainDataset(Dataset):
    """Pre-formed, single-bucket batches of training (and regularisation) images."""

    def __init__(self, subsets: list[SubsetSpec], images: list[ImageEntry], parts: list[_Part], seed: int,
                 prior_loss_weight: float = 1.0, from_config_file: bool = False):
        self.subsets = subsets
        self.images = images
        self.parts = parts
        self.seed = seed
        self.prior_loss_weight = prior_loss_weight
        self.from_config_file = from_config_file
        self.latents: dict[tuple[int, bool], torch.Tensor] | None = None
        self.epoch = 0
        self._plans: list[BatchPlan] = []
        self.set_epoch(0)

    # ----- epochs and batches -----

    def _bucket_members(self) -> list[tuple[int, Size, list[int]]]:
        """(dataset index, bucket, image ids with each id repeated) in a fixed order."""
        members: dict[tuple[int, Size], list[int]] = {}
        for image_id, entry in enumerate(self.images):
            key = (entry.dataset_index, entry.choice.bucket)
            members.setdefault(key, []).extend([image_id] * entry.repeats)
        return [(d, b, ids) for (d, b), ids in sorted(members.items())]

    def set_epoch(self, epoch: int) -> None:
        """Re-form and shuffle the batches for `epoch` (reproducible from seed + epoch)."""
        self.epoch = epoch
        rng = random.Random(self.seed + epoch)
        plans: list[tuple[Size, tuple[int, ...]]] = []
        for dataset_index, bucket, ids in self._bucket_members():
            ids = list(ids)
            rng.shuffle(ids)
            size = self.parts[dataset_index].spec.batch_size
            plans += [(bucket, tuple(ids[i:i + size])) for i in range(0, len(ids), size)]
        rng.shuffle(plans)
        self._plans = [BatchPlan(bucket, ids, rng.getrandbits(63)) for bucket, ids in plans]

    def __len__(self) -> int:
        return len(self._plans)

    def batch_plans(self) -> list[BatchPlan]:
        """This epoch's batches in order."""
        return list(self._plans)

    def __getitem__(self, index: int | BatchPlan) -> Batch:
        plan = index if isinstance(index, BatchPlan) else self._plans[index]
        rng = random.Random(plan.seed)
        captions, weights, pixels, originals, crops = [], [], [], [], []
        for image_id in plan.image_ids:
            entry = self.images[image_id]
            subset = self.subsets[entry.subset_index]
            flip = subset.flip_aug and rng.random() < 0.5
            captions.append(process_caption(entry.caption, subset, rng))
            weights.append(self.prior_loss_weight if subset.is_reg else 1.0)
            originals.append((entry.original_size[1], entry.original_size[0]))
            if self.latents is not None:
                pixels.append(self.latents[(image_id, flip)])
                crops.append(sdxl_crop_top_left(plan.bucket, entry.original_size, flip))
            else:
                loaded = load_for_bucket(entry.path, plan.bucket, entry.choice.resized_size,
                                         random_crop=subset.random_crop, flip=flip, rng=rng)
                pixels.append(loaded.pixels)
                crops.append(loaded.crop_top_left)
        stacked = torch.stack(pixels)
        target = (plan.bucket[1], plan.bucket[0])
        return Batch(captions=captions, loss_weights=torch.tensor(weights, dtype=torch.float32),
                     images=None if self.latents is not None else stacked,
                     latents=stacked if self.latents is not None else None,
                     original_sizes=originals, crop_top_lefts=crops, target_sizes=[target] * len(captions))

    def make_loader(self, num_workers: int = 0, persistent: bool = False) -> DataLoader:
        """A DataLoader over this epoch's batches (call `set_epoch` before iterating each epoch).

        Cache latents before creating the loader: worker processes hold a copy of the dataset.
        """
        workers = max(0, min(num_workers, os.cpu_count() or 1))
        return DataLoader(self, batch_size=None, sampler=_PlanSampler(self), num_workers=workers,
                          persistent_workers=persistent and workers > 0, collate_fn=_as_is)

    # ----- latent cache -----

    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 1,
                      progress: bool = False) -> None:
        """Encode every distinct (image, bucket, flip) once; afterwards batches carry latents.

        `encode` takes pixels (B, 3, H, W) in [-1, 1] and returns scaled latents. Images are centre-cropped,
        and flipped copies are encoded only for subsets with flip_aug.
        """
        from tqdm.auto import tqdm

        jobs: list[tuple[Size, int, bool]] = []
        for image_id, entry in enumerate(self.images):
            flips = (False, True) if self.subsets[entry.subset_index].flip_aug else (False,)
            jobs += [(entry.choice.bucket, image_id, flip) for flip in flips]
        jobs.sort()
        cache: dict[tuple[int, bool], torch.Tensor] = {}
        chunks = _split_by_bucket(jobs, batch_size)
        for chunk in tqdm(chunks, desc="caching latents", disable=not progress):
            pixels = torch.stack([self._centre_pixels(image_id, bucket, flip) for bucket, image_id, flip in chunk])
            with torch.no_grad():
                latents = encode(pixels)
            for (_, image_id, flip), latent in zip(chunk, latents):
                cache[(image_id, flip)] = latent.detach().to("cpu")
        self.latents = cache

    def _centre_pixels(self, image_id: int, bucket: Size, flip: bool) -> torch.Tensor:
        entry = self.images[image_id]
        img = fit_image(load_image(entry.path), bucket, entry.choice.resized_size)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(img)

    # ----- reporting -----

    def summary(self) -> DatasetSummary:
        """Counts, folders and buckets, as printed in the plan and written into the LoRA metadata."""
        members = self._bucket_members()
        parts = [self._part_summary(i, part, members) for i, part in enumerate(self.parts)]
        image_errors = [abs(e.choice.ar_error) for e in self.images]
        return DatasetSummary(
            num_train_images=sum(p.num_train_images for p in parts),
            num_reg_images=sum(p.num_reg_images for p in parts),
            batches_per_epoch=len(self),
            mean_ar_error=sum(image_errors) / len(image_errors) if image_errors else 0.0,
            subsets=[row for p in parts for row in p.subsets],
            buckets=[row for p in parts for row in p.buckets],
            datasets=parts, from_config_file=self.from_config_file)

    def _part_summary(self, index: int, part: _Part, members: list[tuple[int, Size, list[int]]]) -> DatasetPartSummary:
        spec = part.spec
        counts = {bucket: len(ids) for d, bucket, ids in members if d == index}
        order = part.manager.bucket_order(set(counts))
        buckets = [BucketRow(b, counts[b], i, index) for i, b in enumerate(order) if counts.get(b)]
        errors = [abs(e.choice.ar_error) for e in self.images if e.dataset_index == index]
        batches = sum(-(-n // spec.batch_size) for n in counts.values())
        subsets = [_subset_row(self.subsets[s], part.image_counts[s], index) for s in part.subset_indices]
        return DatasetPartSummary(
            index=index, resolution=spec.resolution, batch_size=spec.batch_size,
            enable_bucket=spec.enable_bucket, bucket_no_upscale=spec.bucket_no_upscale,
            min_bucket_reso=spec.min_bucket_reso if spec.enable_bucket else None,
            max_bucket_reso=spec.max_bucket_reso if spec.enable_bucket else None,
            bucket_reso_steps=spec.bucket_reso_steps, num_train_images=part.num_train_images,
            num_reg_images=part.num_reg_images, batches_per_epoch=batches,
            mean_ar_error=sum(errors) / len(errors) if errors else 0.0,
            subsets=subsets, buckets=buckets, tag_frequency=part.tag_frequency)


def _subset_row(subset: SubsetSpec, image_count: int, dataset_index: int) -> SubsetRow:
    return SubsetRow(
        image_dir=str(subset.image_dir), num_repeats=subset.num_repeats, image_count=image_count,
        class_tokens=subset.class_tokens, is_reg=subset.is_reg, dataset_index=dataset_index,
        flip_aug=subset.flip_aug, random_crop=subset.random_crop, color_aug=subset.color_aug,
        shuffle_caption=subset.shuffle_caption, keep_tokens=subset.keep_tokens,
        caption_prefix=subset.caption_prefix, caption_suffix=subset.caption_suffix)


def _split_by_bucket(jobs: list[tuple[Size, int, bool]], batch_size: int) -> list[list[tuple[Size, int, bool]]]:
    """Chunks of at most `batch_size` jobs, never mixing buckets (jobs are sorted by bucket)."""
    chunks: list[list[tuple[Size, int, bool]]] = []
    for job in jobs:
        if chunks and chunks[-1][0][0] == job[0] and len(chunks[-1]) < max(1, batch_size):
            chunks[-1].append(job)
        else:
            chunks.append([job])
    return chunks


class _PlanSampler(Sampler):
    """Yields the dataset's current batch plans, read when each epoch's iteration starts."""

    def __init__(self, dataset: TrainDataset):
        self.dataset = dataset

    def __iter__(self) -> Iterator[BatchPlan]:
        return iter(self.dataset.batch_plans())

    def __len__(self) -> int:
        return len(self.dataset)


def _as_is(batch: Any) -> Any:
    """Collate function for pre-formed batches (module level so worker processes can pickle it)."""
    return batch


# ----- building -----

def build_train_dataset(cfg: Any, seed: int | None = None) -> TrainDataset:
    """Find, check and bucket every image named by `cfg` (sd-scripts option names).

    All unreadable images and bad caption files are reported together in one `DataError`.
    """
    plan = plan_datasets(cfg)
    seed = int(seed if seed is not None else getattr(cfg, "seed", None) or 0)
    subsets: list[SubsetSpec] = []
    images: list[ImageEntry] = []
    parts: list[_Part] = []
    problems: list[str] = []
    missing: list[tuple[Path, int]] = []
    for index, spec in enumerate(plan.datasets):
        where = f"dataset config {plan.config_file} [[datasets]] #{index + 1}" if plan.config_file else "the options"
        part = _build_part(index, spec, where, subsets, images, problems, missing)
        parts.append(part)
    if problems:
        raise DataError(f"{len(problems)} problem(s) with the training images:\n"
                        + "\n".join(f"  - {p}" for p in problems))
    message = missing_caption_message(missing, _caption_extensions(subsets))
    if message:
        logger.warning(message)
    if not any(e.repeats for e in images):
        source = plan.config_file or getattr(cfg, "train_data_dir", None)
        raise DataError(f"no training images found in {source}; put .png/.jpg/.jpeg/.webp/.bmp images "
                        "in a subfolder named like 10_mychar")
    images = [e for e in images if e.repeats > 0]
    prior = getattr(cfg, "prior_loss_weight", None)
    prior = 1.0 if prior is None else float(prior)
    return TrainDataset(subsets, images, parts, seed, prior, plan.from_config_file)


def _caption_extensions(subsets: list[SubsetSpec]) -> str:
    return "/".join(sorted({s.caption_extension for s in subsets}))


def _build_part(index: int, spec: DatasetSpec, where: str, subsets: list[SubsetSpec],
                images: list[ImageEntry], problems: list[str], missing: list[tuple[Path, int]]) -> _Part:
    """Read one dataset's folders, balance its regularisation images and choose buckets."""
    low, high = _check_bucket_limits(spec, where)
    manager = BucketManager(spec.resolution, spec.enable_bucket, spec.bucket_no_upscale, low, high,
                            spec.bucket_reso_steps)
    part = _Part(spec, manager, [], {}, 0, 0, {})
    train_ids: list[int] = []
    reg_ids: list[int] = []
    for subset in spec.subsets:
        if subset.color_aug:
            problems.append(f"{subset.image_dir}: color_aug is not implemented yet; turn it off")
            continue
        try:
            records, sizes, bad = _read_subset(subset)
        except DataError as err:
            problems.append(str(err))
            continue
        problems += bad
        subset_index = len(subsets)
        subsets.append(subset)
        part.subset_indices.append(subset_index)
        part.image_counts[subset_index] = len(records)
        if not records:
            logger.warning("no images in %s; it is skipped", subset.image_dir)
            continue
        missing.append((subset.image_dir, sum(1 for r in records if not r.has_caption_file)))
        _merge_tags(part.tag_frequency, subset.image_dir.name, [r.caption for r in records])
        count = subset.num_repeats * len(records)
        if subset.is_reg:
            part.num_reg_images += count
        else:
            part.num_train_images += count
        for record, size in zip(records, sizes):
            choice = _choose_bucket(manager, record.path, size, problems)
            (reg_ids if subset.is_reg else train_ids).append(len(images))
            images.append(ImageEntry(record.path, record.caption, subset_index, index, size, choice,
                                     subset.num_repeats))
    _apply_reg_balance(part, images, reg_ids, subsets)
    return part


def _choose_bucket(manager: BucketManager, path: Path, size: Size, problems: list[str]) -> BucketChoice:
    choice = manager.select(*size)
    if min(choice.bucket) <= 0:
        problems.append(f"image {path} ({size[0]}x{size[1]}) is smaller than bucket_reso_steps "
                        f"{manager.steps}; enlarge it or remove it")
    return choice


def _apply_reg_balance(part: _Part, images: list[ImageEntry], reg_ids: list[int],
                       subsets: list[SubsetSpec]) -> None:
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
