"""What a training dataset contains, as plain data for the printed plan, `--dry_run` and the LoRA metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.data.buckets import Size


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
    if row.conditioning_data_dir or row.alpha_mask:
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
