"""The dataset part of the `ss_*` metadata written into LoRA files, as sd-scripts writes it (inventory §4.7).

sd-scripts stringifies every value with `str()`: booleans become "True"/"False", tuples "(512, 512)",
None "None", while dicts and lists are JSON. We follow that exactly so tools reading these keys agree.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lorakit.data.summary import DatasetPartSummary, DatasetSummary, SubsetRow


def _bucket_info(part: DatasetPartSummary) -> dict[str, Any] | None:
    """`{"buckets": {i: {resolution, count}}, "mean_img_ar_error": x}`; None without bucketing."""
    if not part.enable_bucket:
        return None
    buckets = {b.index: {"resolution": list(b.resolution), "count": b.count} for b in part.buckets}
    return {"buckets": buckets, "mean_img_ar_error": part.mean_ar_error}


def _dir_infos(rows: list[SubsetRow]) -> dict[str, dict[str, int]]:
    """{folder name: {n_repeats, img_count}}; a repeated name gets " (2)", " (3)" ... as sd-scripts does."""
    infos: dict[str, dict[str, int]] = {}
    for row in rows:
        name = base = os.path.basename(row.name)
        suffix = 2
        while name in infos:
            name, suffix = f"{base} ({suffix})", suffix + 1
        infos[name] = {"n_repeats": row.num_repeats, "img_count": row.image_count}
    return infos


def _subset_entry(row: SubsetRow) -> dict[str, Any]:
    entry = {
        "img_count": row.image_count, "num_repeats": row.num_repeats, "color_aug": row.color_aug,
        "flip_aug": row.flip_aug, "random_crop": row.random_crop, "shuffle_caption": row.shuffle_caption,
        "keep_tokens": row.keep_tokens, "keep_tokens_separator": row.keep_tokens_separator,
        "secondary_separator": row.secondary_separator, "enable_wildcard": row.enable_wildcard,
        "caption_prefix": row.caption_prefix, "caption_suffix": row.caption_suffix,
        "resize_interpolation": row.resize_interpolation,
    }
    if row.metadata_file:  # fine-tuning subsets name their metadata file instead of a folder
        entry["metadata_file"] = os.path.basename(row.metadata_file)
    else:
        entry.update(image_dir=os.path.basename(row.image_dir), class_tokens=row.class_tokens, is_reg=row.is_reg)
    return entry


def _dataset_entry(part: DatasetPartSummary) -> dict[str, Any]:
    return {
        "is_dreambooth": part.kind != "fine_tuning", "batch_size_per_device": part.batch_size,
        "num_train_images": part.num_train_images, "num_reg_images": part.num_reg_images,
        "resolution": list(part.resolution), "enable_bucket": part.enable_bucket,
        "min_bucket_reso": part.min_bucket_reso, "max_bucket_reso": part.max_bucket_reso,
        "tag_frequency": part.tag_frequency, "bucket_info": _bucket_info(part), "resize_interpolation": None,
        "subsets": [_subset_entry(row) for row in part.subsets],
    }


def _merged_tag_frequency(summary: DatasetSummary) -> dict[str, dict[str, int]]:
    """Tag counts per folder name across datasets; the first dataset using a folder name wins."""
    merged: dict[str, dict[str, int]] = {}
    for part in summary.datasets:
        for folder, counts in part.tag_frequency.items():
            merged.setdefault(folder, counts)
    return merged


def _config_file_keys(summary: DatasetSummary) -> dict[str, str]:
    train_rows = [row for row in summary.subsets if not row.is_reg]
    return {
        "ss_datasets": json.dumps([_dataset_entry(part) for part in summary.datasets]),
        "ss_tag_frequency": json.dumps(_merged_tag_frequency(summary)),
        "ss_dataset_dirs": json.dumps(_dir_infos(train_rows)),
    }


def _folder_keys(summary: DatasetSummary, cfg: Any, num_processes: int, grad_accum: int) -> dict[str, Any]:
    part = summary.datasets[0]
    batch_size = getattr(cfg, "train_batch_size", None) or part.batch_size
    return {
        "ss_batch_size_per_device": batch_size,
        "ss_total_batch_size": batch_size * num_processes * grad_accum,
        "ss_resolution": tuple(part.resolution),
        "ss_color_aug": bool(getattr(cfg, "color_aug", False)),
        "ss_flip_aug": bool(getattr(cfg, "flip_aug", False)),
        "ss_random_crop": bool(getattr(cfg, "random_crop", False)),
        "ss_shuffle_caption": bool(getattr(cfg, "shuffle_caption", False)),
        "ss_enable_bucket": part.enable_bucket,
        "ss_bucket_no_upscale": part.bucket_no_upscale,
        "ss_min_bucket_reso": part.min_bucket_reso,
        "ss_max_bucket_reso": part.max_bucket_reso,
        "ss_keep_tokens": getattr(cfg, "keep_tokens", 0) or 0,
        "ss_dataset_dirs": json.dumps(_dir_infos([r for r in part.subsets if not r.is_reg])),
        "ss_reg_dataset_dirs": json.dumps(_dir_infos([r for r in part.subsets if r.is_reg])),
        "ss_tag_frequency": json.dumps(part.tag_frequency),
        "ss_bucket_info": json.dumps(_bucket_info(part)),
    }


def dataset_metadata(summary: DatasetSummary, cfg: Any, num_processes: int = 1,
                     gradient_accumulation_steps: int | None = None) -> dict[str, str]:
    """The dataset `ss_*` keys for `summary`, every value a string.

    `ss_num_batches_per_epoch` is the per-process loader length, as sd-scripts measures it after
    distributing the loader over `num_processes`.
    """
    grad_accum = gradient_accumulation_steps or getattr(cfg, "gradient_accumulation_steps", None) or 1
    processes = max(1, num_processes)
    values: dict[str, Any] = {
        "ss_num_train_images": summary.num_train_images,
        "ss_num_reg_images": summary.num_reg_images,
        "ss_num_batches_per_epoch": -(-summary.batches_per_epoch // processes),
    }
    if summary.from_config_file:
        values.update(_config_file_keys(summary))
    else:
        values.update(_folder_keys(summary, cfg, processes, grad_accum))
    return {key: str(value) for key, value in values.items()}
