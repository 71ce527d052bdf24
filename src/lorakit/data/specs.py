"""Resolved dataset settings: what one subset folder and one dataset (a batch-size/resolution group) use.

These are the values after the sd-scripts lookup order (subset -> dataset -> general -> command line ->
default) has been applied, so the rest of the pipeline never looks at raw options again. New dataset keys
become new fields here plus a row in the key tables of `dataset_config.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The three kinds of `[[datasets]]` entry sd-scripts infers from the keys of their subsets.
DREAMBOOTH, FINE_TUNING, CONDITIONING = "dreambooth", "fine_tuning", "conditioning"


@dataclass(frozen=True)
class SubsetSpec:
    """One image folder (or fine-tuning metadata file) and how its images and captions are treated."""

    image_dir: Path | None
    is_reg: bool = False
    num_repeats: int = 1
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    shuffle_caption: bool = False
    caption_separator: str = ","
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    flip_aug: bool = False
    random_crop: bool = False
    color_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    alpha_mask: bool = False
    cache_info: bool = False
    resize_interpolation: str | None = None
    metadata_file: Path | None = None
    conditioning_data_dir: Path | None = None
    custom_attributes: dict[str, Any] | None = None

    @property
    def source(self) -> Path:
        """The file or folder this subset is read from, for messages and metadata."""
        return self.metadata_file or self.image_dir or Path(".")

    @property
    def varies_captions(self) -> bool:
        """True when a caption can change from step to step (so text-encoder outputs cannot be cached)."""
        return bool(self.shuffle_caption or self.caption_dropout_rate or self.caption_dropout_every_n_epochs
                    or self.caption_tag_dropout_rate or self.token_warmup_step or self.enable_wildcard)


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
    network_multiplier: float = 1.0
    validation_split: float = 0.0  # fraction of each non-regularisation subset held out for validation
    validation_seed: int | None = None  # seed of that split (None: the run's seed)
    kind: str = DREAMBOOTH


@dataclass(frozen=True)
class DatasetPlan:
    """Every dataset to train on, and the config file they came from (None: `--train_data_dir` folders)."""

    datasets: tuple[DatasetSpec, ...]
    config_file: Path | None = None

    @property
    def from_config_file(self) -> bool:
        """True when the datasets were described by `--dataset_config`."""
        return self.config_file is not None
