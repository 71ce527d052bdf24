"""`--debug_dataset`: show what training would see, batch by batch, and stop before any model loads.

sd-scripts prints every batch's images (key, size, loss weight, processed caption, original size, crop, target
size, custom attributes) and, on Windows, shows them in an OpenCV window. lorakit prints the same for the first
epoch of the training images (and of the held-out validation images) and writes each batch's images, as the
model would receive them (bucketed, cropped, flipped, colour-augmented), to `<output_dir>/debug_dataset/`, so it
also works without a display.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger("lorakit")


def debug_dataset(cfg: Any, dataset: Any) -> list[Path]:
    """Print every batch of the first epoch and write its images; returns the files written."""
    folder = Path(cfg.output_dir) / "debug_dataset"
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, part in (("train", dataset), ("validation", getattr(dataset, "validation", None))):
        if part is None:
            continue
        part.set_epoch(1)
        plans = part.batch_plans()
        print(f"{name}: {len(plans)} batches in epoch 1", flush=True)
        for step, plan in enumerate(plans, start=1):
            written += _show_batch(part, plan, f"{name}_{step:06d}", folder)
    print(f"--debug_dataset: wrote {len(written)} images to {folder}; nothing was trained", flush=True)
    return written


def _show_batch(dataset: Any, plan: Any, label: str, folder: Path) -> list[Path]:
    batch = dataset[plan]
    print(f"{label}: bucket {plan.bucket[0]}x{plan.bucket[1]}", flush=True)
    files = []
    for j, image_id in enumerate(plan.image_ids):
        entry = dataset.images[image_id]
        attributes = batch.custom_attributes[j] if batch.custom_attributes else {}
        print(f"  {entry.path}, size: {entry.original_size}, loss weight: {float(batch.loss_weights[j])}, "
              f'caption: "{batch.captions[j]}", original size: {batch.original_sizes[j]}, '
              f"crop top left: {batch.crop_top_lefts[j]}, target size: {batch.target_sizes[j]}"
              + (f", custom attributes: {attributes}" if attributes else ""), flush=True)
        pixels = batch.images[j] if batch.images is not None else None
        if pixels is not None:
            path = folder / f"{label}_{j:02d}_{entry.path.stem}.png"
            array = ((pixels.float().clamp(-1, 1).numpy() + 1.0) * 127.5).round().astype(np.uint8)
            Image.fromarray(np.transpose(array, (1, 2, 0))).save(path)
            files.append(path)
    return files
