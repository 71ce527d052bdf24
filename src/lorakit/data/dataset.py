"""The training dataset: images grouped into buckets, pre-formed batches, per-epoch shuffling, latent cache.

Batches are formed here, within one bucket each, and the DataLoader only fetches them (no collation). Each
epoch's batches are computed on demand from the seed and the epoch (`lorakit.data.epoch_order`), so the
repeats of a folder cost no memory; each batch carries its own seed and position,
so flips, crops, colour jitter and caption processing do not depend on the number of worker processes, and
a resumed run that skips the first batches of an epoch sees exactly the batches an uninterrupted run saw.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lorakit.data.augment import color_augment, face_crop_placement
from lorakit.data.batch import Batch
from lorakit.data.buckets import BucketChoice, Size
from lorakit.data.captions import CaptionContext, process_caption
from lorakit.data.epoch_order import BatchPlan, EpochBatches, bucket_groups
from lorakit.data.images import (
    Placement, apply_placement, bucket_placement, load_image, load_image_and_alpha, size_condition_crop, to_tensor,
)
from lorakit.data.latent_files import read_entry
from lorakit.data.conditioning import load_conditioning_image, mask_from_conditioning
from lorakit.data.masks import place_alpha
from lorakit.data.specs import SubsetSpec
from lorakit.data.summary import DatasetSummary, summarize
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
    conditioning_path: Path | None = None  # its conditioning image (data/conditioning.py)
    face: tuple[int, int, int, int] | None = None  # (cx, cy, w, h) from the file name


class TrainDataset(Dataset):
    """Pre-formed, single-bucket batches of training (and regularisation) images."""

    def __init__(self, subsets: list[SubsetSpec], images: list[ImageEntry], parts: list[Any], seed: int,
                 prior_loss_weight: float = 1.0, from_config_file: bool = False, conditioning_masks: bool = False):
        self.subsets = subsets
        self.images = images
        self.parts = parts
        self.seed = seed
        self.prior_loss_weight = prior_loss_weight
        self.from_config_file = from_config_file
        self.conditioning_masks = conditioning_masks  # --masked_loss: a conditioning image is also the loss mask
        self.latents: dict[tuple[int, bool], torch.Tensor] | None = None
        self.cached_alpha: dict[tuple[int, bool], torch.Tensor] = {}
        self.latent_files: dict[int, tuple[Path, Any]] | None = None  # image id -> (file, format)
        self.replacements: dict[str, str | list[str]] = {}
        self.max_train_steps = 0
        self.gradient_accumulation_steps = 1
        self.epoch = 0
        self._skip = 0
        self._plans: EpochBatches = EpochBatches([], seed, 0)
        self.rank, self.world_size = 0, 1  # this process's share of each epoch (see `shard`)
        self.validation: TrainDataset | None = None  # images held out by a validation split (data/holdout.py)
        self.set_epoch(0)

    # ----- epochs, steps and batches -----

    def bucket_counts(self) -> list[tuple[int, Size, int]]:
        """(dataset index, bucket, images x repeats) of every non-empty bucket, in a fixed order."""
        return [(g.dataset_index, g.bucket, g.slots) for g in self._groups()]

    def _groups(self):
        entries = [(e.dataset_index, e.choice.bucket, image_id, e.repeats) for image_id, e in enumerate(self.images)]
        return bucket_groups(entries, [part.spec.batch_size for part in self.parts])

    def set_epoch(self, epoch: int) -> None:
        """Use the batches of `epoch` (counted from 1; reproducible from seed + epoch)."""
        self.epoch = epoch
        self._skip = 0
        self._plans = EpochBatches(self._groups(), self.seed, epoch, self.rank, self.world_size)

    def shard(self, rank: int, world_size: int) -> None:
        """Keep only process `rank`'s share of every epoch's batches (see `lorakit.data.sharding`)."""
        self.rank, self.world_size = rank, world_size
        self.set_epoch(self.epoch)

    def set_training_length(self, max_train_steps: int, gradient_accumulation_steps: int = 1) -> None:
        """Steps of the run, for token warm-up (a token_warmup_step below 1 is a fraction of them)."""
        self.max_train_steps = int(max_train_steps)
        self.gradient_accumulation_steps = max(1, int(gradient_accumulation_steps))

    def skip_batches(self, count: int) -> None:
        """Start this epoch's iterations at batch `count` (resuming mid-epoch), until the next `set_epoch`."""
        if not 0 <= count <= len(self._plans):
            raise ValueError(f"cannot skip {count} of {len(self._plans)} batches")
        self._skip = count

    def add_replacement(self, key: str, value: str | list[str]) -> None:
        """Replace `key` in every caption (textual inversion tokens); an empty key replaces whole captions."""
        self.replacements[key] = value

    def __len__(self) -> int:
        return len(self._plans)

    def batch_plans(self) -> list[BatchPlan]:
        """This epoch's batches in order (as a list: for small datasets and tests)."""
        return list(self._plans)

    def _plans_to_load(self) -> Iterator[BatchPlan]:
        """The batches the next iteration yields: the epoch's, from the skipped position on.

        Reading them changes nothing: a multi-process DataLoader starts its sampler twice for its first
        iteration, and both starts must see the same batches.
        """
        return self._plans.starting_at(self._skip)

    def _context(self, plan: BatchPlan) -> CaptionContext:
        micro = max(0, plan.epoch - 1) * len(self._plans) + plan.index
        return CaptionContext(plan.epoch, micro // self.gradient_accumulation_steps, self.max_train_steps)

    # ----- loading one batch -----

    def __getitem__(self, index: int | BatchPlan) -> Batch:
        plan = index if isinstance(index, BatchPlan) else self._plans[index]
        rng = random.Random(plan.seed)
        context = self._context(plan)
        cached = self.latents is not None or self.latent_files is not None
        captions, weights, pixels, masks, conditioning, originals, crops = [], [], [], [], [], [], []
        for image_id in plan.image_ids:
            entry = self.images[image_id]
            subset = self.subsets[entry.subset_index]
            flip = subset.flip_aug and rng.random() < 0.5
            captions.append(process_caption(entry.caption, subset, rng, context, self.replacements))
            weights.append(self.prior_loss_weight if subset.is_reg else 1.0)
            originals.append((entry.original_size[1], entry.original_size[0]))
            crops.append(size_condition_crop(plan.bucket, entry.original_size, flip))
            if cached:
                latent, alpha, placement = self._cached(image_id, plan.bucket, flip)
            else:
                latent, alpha, placement = self._load_pixels(entry, subset, plan.bucket, flip, rng)
            pair = self._conditioning(entry, subset, placement)
            pixels.append(latent)
            conditioning.append(pair)
            masks.append(mask_from_conditioning(pair) if pair is not None and self.conditioning_masks else alpha)
        stacked = torch.stack(pixels)
        target = (plan.bucket[1], plan.bucket[0])
        return Batch(captions=captions, loss_weights=torch.tensor(weights, dtype=torch.float32),
                     images=None if cached else stacked, latents=stacked if cached else None,
                     original_sizes=originals, crop_top_lefts=crops, target_sizes=[target] * len(captions),
                     masks=_stack_masks(masks, target), conditioning_images=_stack_conditioning(conditioning),
                     custom_attributes=[dict(self.subsets[self.images[i].subset_index].custom_attributes or {})
                                        for i in plan.image_ids])

    def _placement(self, entry: ImageEntry, subset: SubsetSpec, bucket: Size, flip: bool,
                   rng: random.Random) -> Placement:
        spec = self.parts[entry.dataset_index].spec
        if subset.face_crop_aug_range and entry.face and not spec.enable_bucket:
            return face_crop_placement(entry.original_size, entry.face, bucket, subset.face_crop_aug_range,
                                       subset.random_crop, rng, flip)
        return bucket_placement(bucket, entry.choice.resized_size, subset.random_crop, rng, flip)

    def _load_pixels(self, entry: ImageEntry, subset: SubsetSpec, bucket: Size, flip: bool,
                     rng: random.Random) -> tuple[torch.Tensor, torch.Tensor | None, Placement]:
        """Pixels in [-1, 1] fitted to the bucket, its alpha mask placed the same way, and the placement."""
        placement = self._placement(entry, subset, bucket, flip, rng)
        img, alpha = _decode(entry.path, subset.alpha_mask)
        img = apply_placement(img, placement, subset.resize_interpolation)
        if subset.color_aug:
            img = color_augment(img, rng)  # the image only: a conditioning image keeps its colours
        mask = place_alpha(alpha, placement, subset.resize_interpolation) if subset.alpha_mask else None
        return to_tensor(img), mask, placement

    def _conditioning(self, entry: ImageEntry, subset: SubsetSpec, placement: Placement) -> torch.Tensor | None:
        """The image's conditioning image placed exactly like the image (resize, crop, flip), or None."""
        if entry.conditioning_path is None:
            return None
        return load_conditioning_image(entry.conditioning_path, placement, subset.resize_interpolation)

    def _cached(self, image_id: int, bucket: Size, flip: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None, Placement]:
        """Cached latents, the image's alpha mask (from the cache) and the centred placement caching used."""
        entry = self.images[image_id]
        subset = self.subsets[entry.subset_index]
        placement = bucket_placement(bucket, entry.choice.resized_size, flip=flip)
        if self.latent_files is not None:
            path, fmt = self.latent_files[image_id]
            try:
                latent, alpha = read_entry(path, bucket, fmt, flip)
            except (OSError, KeyError) as err:
                raise DataError(f"latent cache {path} cannot be read ({err}); delete it to re-encode") from None
            if alpha is not None and flip:
                alpha = alpha.flip(-1)
        else:
            latent, alpha = self.latents[(image_id, flip)], self.cached_alpha.get((image_id, flip))
        return latent, alpha if subset.alpha_mask else None, placement

    def make_loader(self, num_workers: int = 0, persistent: bool = False) -> DataLoader:
        """A DataLoader over this epoch's batches (call `set_epoch` before iterating each epoch).

        Cache latents before creating the loader: worker processes hold a copy of the dataset.
        """
        workers = max(0, min(num_workers, os.cpu_count() or 1))
        return DataLoader(self, batch_size=None, sampler=_PlanSampler(self), num_workers=workers,
                          persistent_workers=persistent and workers > 0, collate_fn=_as_is)

    # ----- latent cache (see lorakit.data.cache) -----

    def centre_pixels(self, image_id: int, bucket: Size, flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image centre-cropped to `bucket` (as caching sees it) and its alpha mask when it needs one."""
        entry = self.images[image_id]
        subset = self.subsets[entry.subset_index]
        placement = bucket_placement(bucket, entry.choice.resized_size, flip=flip)
        img, alpha = _decode(entry.path, subset.alpha_mask)
        img = apply_placement(img, placement, subset.resize_interpolation)
        mask = place_alpha(alpha, placement, subset.resize_interpolation) if subset.alpha_mask else None
        return to_tensor(img), mask

    def _centre_pixels(self, image_id: int, bucket: Size, flip: bool) -> torch.Tensor:
        return self.centre_pixels(image_id, bucket, flip)[0]

    # ----- reporting -----

    def summary(self) -> DatasetSummary:
        """Counts, folders and buckets, as printed in the plan and written into the LoRA metadata."""
        return summarize(self)

    def fixed_caption(self, image_id: int) -> str:
        """The caption every step sees for an image, when its subset does not change captions per step (what
        text-encoder caching encodes)."""
        entry = self.images[image_id]
        return process_caption(entry.caption, self.subsets[entry.subset_index], random.Random(0), CaptionContext(),
                               self.replacements)

    def captions_vary(self) -> bool:
        """True when some caption changes between steps, so text-encoder outputs cannot be cached."""
        return any(subset.varies_captions for subset in self.subsets)


def _decode(path: Path, with_alpha: bool) -> tuple[Any, Any]:
    """The RGB image and (when asked for) its alpha channel from one decode of the file."""
    return load_image_and_alpha(path) if with_alpha else (load_image(path), None)


def _stack_masks(masks: list[torch.Tensor | None], target_hw: tuple[int, int]) -> torch.Tensor | None:
    """(B, 1, H, W) masks for a batch, ones for images without a mask; None when no image has one."""
    if all(mask is None for mask in masks):
        return None
    full = [torch.ones(target_hw) if mask is None else mask for mask in masks]
    return torch.stack(full).unsqueeze(1)


def _stack_conditioning(images: list[torch.Tensor | None]) -> torch.Tensor | None:
    """(B, 3, H, W) conditioning images in [-1, 1], or None when the batch has none.

    A batch is drawn from one dataset, whose subsets are all of one kind, so either every image has one or none.
    """
    if all(image is None for image in images):
        return None
    if any(image is None for image in images):
        raise DataError("a batch mixes images with and without conditioning images; put conditioning subsets "
                        "in a [[datasets]] of their own")
    return torch.stack(images)


class _PlanSampler(Sampler):
    """Yields the dataset's current batch plans, read when each epoch's iteration starts."""

    def __init__(self, dataset: TrainDataset):
        self.dataset = dataset

    def __iter__(self) -> Iterator[BatchPlan]:
        return self.dataset._plans_to_load()

    def __len__(self) -> int:
        return len(self.dataset) - self.dataset._skip


def _as_is(batch: Any) -> Any:
    """Collate function for pre-formed batches (module level so worker processes can pickle it)."""
    return batch
