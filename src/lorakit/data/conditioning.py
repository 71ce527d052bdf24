"""Conditioning images (`conditioning_data_dir`): one image per training image, matched by file name.

A conditioning image is what a ControlNet is steered by, a reference image some families read next to the
caption, or (with `--masked_loss`) a loss mask in its red channel. Whatever a run does with it, the data layer
treats it the same way: it is found by the training image's file name without extension (sd-scripts'
`glob_images(conditioning_data_dir, basename)`, any image extension), checked at start-up (missing, unreadable,
of another size than its image, or left over without an image: every problem named together), and placed
exactly like its image (the same resize, crop and flip), so the pair stays aligned in every bucket.

How a run uses conditioning subsets is the training type's choice (`ConditioningUse`):

* `MASK` (LoRA and textual-inversion training, as sd-scripts): allowed only with `--masked_loss`;
* `OPTIONAL`: allowed, and delivered in the batch when present;
* `REQUIRED` (ControlNet training): every subset must have one; without a dataset config, `--train_data_dir`
  is the image folder itself and `--conditioning_data_dir` its conditioning folder (sd-scripts'
  `generate_controlnet_subsets_config_by_subdirs`).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import torch

from lorakit.data.buckets import Size
from lorakit.data.discovery import IMAGE_EXTENSIONS, list_images
from lorakit.data.images import Placement, apply_placement, image_size, load_image, to_tensor
from lorakit.errors import DataError


class ConditioningUse(str, Enum):
    """What a training type does with `conditioning_data_dir` subsets."""

    MASK = "mask"
    OPTIONAL = "optional"
    REQUIRED = "required"


def conditioning_files(image_paths: list[Path], conditioning_dir: Path) -> tuple[dict[Path, Path], list[str]]:
    """Match every image with the file of the same stem in `conditioning_dir`.

    Returns {image: conditioning image} and the problems: a missing folder, images without a conditioning
    image, conditioning images without an image (sd-scripts refuses those too).
    """
    if not conditioning_dir.is_dir():
        return {}, [f"conditioning_data_dir {conditioning_dir} does not exist"]
    by_stem: dict[str, Path] = {}
    for path in list_images(conditioning_dir):
        by_stem.setdefault(path.stem, path)
    matched: dict[Path, Path] = {}
    problems: list[str] = []
    for image in image_paths:
        found = by_stem.pop(image.stem, None)
        if found is None:
            problems.append(f"image {image} has no conditioning image in {conditioning_dir} (expected "
                            f"{image.stem} with one of {', '.join(IMAGE_EXTENSIONS)})")
        else:
            matched[image] = found
    problems += [f"conditioning image {path} has no training image of the same name"
                 for path in sorted(by_stem.values())]
    return matched, problems


def check_conditioning_size(conditioning: Path, image: Path, image_size_wh: Size) -> str | None:
    """A problem message when the conditioning image's size differs from its image's, else None."""
    try:
        size = image_size(conditioning)
    except DataError as err:
        return str(err)
    if size != tuple(image_size_wh):
        return (f"conditioning image {conditioning} is {size[0]}x{size[1]} but its image {image} is "
                f"{image_size_wh[0]}x{image_size_wh[1]}; they must have the same size")
    return None


def load_conditioning_image(path: Path, placement: Placement, interpolation: str | None = None) -> torch.Tensor:
    """The conditioning image as RGB, placed like its image, as (3, H, W) in [-1, 1] (as sd-scripts' batches)."""
    return to_tensor(apply_placement(load_image(path), placement, interpolation))


def mask_from_conditioning(image: torch.Tensor) -> torch.Tensor:
    """The loss mask of a placed conditioning image: its red channel, (H, W) in [0, 1]."""
    return image[0].add(1.0).mul(127.5).round().div(255.0)
