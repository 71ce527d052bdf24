"""What a training dataset contains, as plain data for the printed plan, `--dry_run` and the LoRA metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorakit.data.buckets import Size
from lorakit.data.specs import SubsetSpec

if TYPE_CHECKING:
    from lorakit.data.dataset import TrainDataset


@dataclass(frozen=True)
class SubsetRow:
    """One image folder. `image_count` counts files once; `num_repeats` is the folder's own setting."""

    image_dir: str
    num_repeats: int
    image_count: int
    class_tokens: str | None
    is_reg: bool
    dataset_index: int = 0
    flip_aug: bool = False
    random_crop: bool = False
    color_aug: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    resize_interpolation: str | None = None
    metadata_file: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    face_crop_aug_range: tuple[float, float] | None = None
    alpha_mask: bool = False
    conditioning_data_dir: str | None = None

    @property
    def name(self) -> str:
        """What the folder is shown as: the image folder, or the metadata file for fine-tuning."""
        return self.metadata_file or self.image_dir


@dataclass(frozen=True)
class BucketRow:
    """One non-empty bucket; `count` includes repeats. `index` is sd-scripts' bucket number."""

    resolution: Size  # (width, height)
    count: int
    index: int
    dataset_index: int = 0


@dataclass(frozen=True)
class DatasetPartSummary:
    """One `[[datasets]]` entry (or the single dataset built from folders)."""

    index: int
    resolution: Size
    batch_size: int
    enable_bucket: bool
    bucket_no_upscale: bool
    min_bucket_reso: int | None
    max_bucket_reso: int | None
    bucket_reso_steps: int
    num_train_images: int
    num_reg_images: int
    batches_per_epoch: int
    mean_ar_error: float
    subsets: list[SubsetRow]
    buckets: list[BucketRow]
    tag_frequency: dict[str, dict[str, int]]
    kind: str = "dreambooth"


@dataclass(frozen=True)
class DatasetSummary:
    """The whole training data: totals, folder rows, bucket rows and the per-dataset parts."""

    num_train_images: int  # images x repeats, as sd-scripts counts them
    num_reg_images: int
    batches_per_epoch: int
    mean_ar_error: float
    subsets: list[SubsetRow]
    buckets: list[BucketRow]
    datasets: list[DatasetPartSummary] = field(default_factory=list)
    from_config_file: bool = False


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _kind(row: SubsetRow) -> str:
    kind = "reg" if row.is_reg else "train"
    if row.conditioning_data_dir:
        kind += " +conditioning"
    if row.alpha_mask:
        kind += " +mask"
    return kind


def format_summary(summary: DatasetSummary) -> str:
    """A readable multi-line description of the dataset for the printed plan."""
    lines = [f"Images: {summary.num_train_images} training (with repeats), "
             f"{summary.num_reg_images} regularisation; {summary.batches_per_epoch} batches per epoch"]
    for part in summary.datasets:
        bucketing = "off"
        if part.enable_bucket:
            bucketing = ("no upscale" if part.bucket_no_upscale else
                         f"{part.min_bucket_reso}-{part.max_bucket_reso}") + f", steps {part.bucket_reso_steps}"
        lines.append(f"Dataset {part.index + 1}: resolution {part.resolution[0]}x{part.resolution[1]}, "
                     f"batch size {part.batch_size}, buckets {bucketing}, {part.batches_per_epoch} batches")
        subset_rows = [[s.name, str(s.num_repeats), str(s.image_count), s.class_tokens or "", _kind(s)]
                       for s in part.subsets]
        lines += _table(["folder", "repeats", "images", "class tokens", "kind"], subset_rows)
        bucket_rows = [[f"{b.resolution[0]}x{b.resolution[1]}", str(b.count)] for b in part.buckets]
        lines += _table(["bucket (WxH)", "images x repeats"], bucket_rows)
        if part.enable_bucket:
            lines.append(f"  mean aspect-ratio error: {part.mean_ar_error:.4f}")
    return "\n".join(lines)


# ----- building a summary from a dataset -----

def summarize(dataset: TrainDataset) -> DatasetSummary:
    """Counts, folders and buckets of a dataset, as printed in the plan and written into the metadata."""
    counts = dataset.bucket_counts()
    parts = [_part_summary(dataset, i, part, counts) for i, part in enumerate(dataset.parts)]
    image_errors = [abs(e.choice.ar_error) for e in dataset.images]
    return DatasetSummary(
        num_train_images=sum(p.num_train_images for p in parts),
        num_reg_images=sum(p.num_reg_images for p in parts),
        batches_per_epoch=len(dataset),
        mean_ar_error=sum(image_errors) / len(image_errors) if image_errors else 0.0,
        subsets=[row for p in parts for row in p.subsets],
        buckets=[row for p in parts for row in p.buckets],
        datasets=parts, from_config_file=dataset.from_config_file)


def _part_summary(dataset: TrainDataset, index: int, part: Any,
                  bucket_counts: list[tuple[int, Size, int]]) -> DatasetPartSummary:
    spec = part.spec
    counts = {bucket: count for d, bucket, count in bucket_counts if d == index}
    order = part.manager.bucket_order(set(counts))
    buckets = [BucketRow(b, counts[b], i, index) for i, b in enumerate(order) if counts.get(b)]
    errors = [abs(e.choice.ar_error) for e in dataset.images if e.dataset_index == index]
    batches = sum(-(-n // spec.batch_size) for n in counts.values())
    subsets = [_subset_row(dataset.subsets[s], part.image_counts[s], index) for s in part.subset_indices]
    return DatasetPartSummary(
        index=index, resolution=spec.resolution, batch_size=spec.batch_size,
        enable_bucket=spec.enable_bucket, bucket_no_upscale=spec.bucket_no_upscale,
        min_bucket_reso=part.manager.min_reso if spec.enable_bucket else None,  # as rounded to the steps
        max_bucket_reso=part.manager.max_reso if spec.enable_bucket else None,
        bucket_reso_steps=spec.bucket_reso_steps, num_train_images=part.num_train_images,
        num_reg_images=part.num_reg_images, batches_per_epoch=batches,
        mean_ar_error=sum(errors) / len(errors) if errors else 0.0,
        subsets=subsets, buckets=buckets, tag_frequency=part.tag_frequency, kind=spec.kind)


def _subset_row(subset: SubsetSpec, image_count: int, dataset_index: int) -> SubsetRow:
    return SubsetRow(
        image_dir=str(subset.image_dir or ""), num_repeats=subset.num_repeats, image_count=image_count,
        class_tokens=subset.class_tokens, is_reg=subset.is_reg, dataset_index=dataset_index,
        flip_aug=subset.flip_aug, random_crop=subset.random_crop, color_aug=subset.color_aug,
        shuffle_caption=subset.shuffle_caption, keep_tokens=subset.keep_tokens,
        caption_prefix=subset.caption_prefix, caption_suffix=subset.caption_suffix,
        keep_tokens_separator=subset.keep_tokens_separator, secondary_separator=subset.secondary_separator,
        enable_wildcard=subset.enable_wildcard, resize_interpolation=subset.resize_interpolation,
        metadata_file=str(subset.metadata_file) if subset.metadata_file else None,
        caption_dropout_rate=subset.caption_dropout_rate,
        caption_dropout_every_n_epochs=subset.caption_dropout_every_n_epochs,
        caption_tag_dropout_rate=subset.caption_tag_dropout_rate,
        face_crop_aug_range=subset.face_crop_aug_range, alpha_mask=subset.alpha_mask,
        conditioning_data_dir=str(subset.conditioning_data_dir) if subset.conditioning_data_dir else None)
