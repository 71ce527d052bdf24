"""Resolved dataset settings: what one subset folder and one dataset (a batch-size/resolution group) use.

These are the values after the sd-scripts lookup order (subset -> dataset -> general -> command line ->
default) has been applied, so the rest of the pipeline never looks at raw options again. New dataset keys
(fine-tuning metadata, masks, caption dropout ...) become new fields here plus a row in the key tables of
`dataset_config.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SubsetSpec:
    """One DreamBooth-style image folder and how its images and captions are treated."""

    image_dir: Path
    is_reg: bool = False
    num_repeats: int = 1
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    keep_tokens: int = 0
    shuffle_caption: bool = False
    caption_separator: str = ","
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    flip_aug: bool = False
    random_crop: bool = False
    color_aug: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """A group of subsets sharing one resolution, batch size and bucketing setup."""

    subsets: tuple[SubsetSpec, ...]
    resolution: tuple[int, int]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


@dataclass(frozen=True)
class DatasetPlan:
    """Every dataset to train on, and the config file they came from (None: `--train_data_dir` folders)."""

    datasets: tuple[DatasetSpec, ...]
    config_file: Path | None = None

    @property
    def from_config_file(self) -> bool:
        """True when the datasets were described by `--dataset_config`."""
        return self.config_file is not None
