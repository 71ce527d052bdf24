"""Loss masks: conditioning images (`conditioning_data_dir`, red channel) and alpha channels (`alpha_mask`).

A mask is a float tensor in [0, 1] (0-255 / 255) with the image's bucket size; the training loop shrinks it to
latent size with `mask_to_latent` and multiplies the element-wise loss by it (inventory §5.5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lorakit.data.buckets import Size
from lorakit.data.discovery import IMAGE_EXTENSIONS, list_images
from lorakit.data.images import Placement, apply_placement, image_size, load_image
from lorakit.errors import DataError


def conditioning_files(image_paths: list[Path], conditioning_dir: Path) -> tuple[dict[Path, Path], list[str]]:
    """Match every image with the file of the same stem in `conditioning_dir`.

    Returns {image: mask} and the problems: missing folder, images without a mask, masks without an image.
    """
    if not conditioning_dir.is_dir():
        return {}, [f"conditioning_data_dir {conditioning_dir} does not exist"]
    by_stem: dict[str, Path] = {}
    for path in list_images(conditioning_dir):
        by_stem.setdefault(path.stem, path)
    matched: dict[Path, Path] = {}
    problems: list[str] = []
    for image in image_paths:
        mask = by_stem.pop(image.stem, None)
        if mask is None:
            problems.append(f"image {image} has no mask in {conditioning_dir} (expected {image.stem}"
                            f" with one of {', '.join(IMAGE_EXTENSIONS)})")
        else:
            matched[image] = mask
    problems += [f"mask {path} has no image of the same name" for path in sorted(by_stem.values())]
    return matched, problems


def check_mask_size(mask: Path, image: Path, image_size_wh: Size) -> str | None:
    """A problem message when the mask's size differs from its image's, else None."""
    try:
        size = image_size(mask)
    except DataError as err:
        return str(err)
    if size != tuple(image_size_wh):
        return (f"mask {mask} is {size[0]}x{size[1]} but its image {image} is "
                f"{image_size_wh[0]}x{image_size_wh[1]}; masks must have the image's size")
    return None


def _to_unit_tensor(channel: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(channel, dtype=np.float32) / 255.0)


def load_conditioning_mask(path: Path, placement: Placement, interpolation: str | None = None) -> torch.Tensor:
    """The red channel of a conditioning image, placed like its image, as (H, W) in [0, 1]."""
    red = load_image(path).getchannel("R")
    return _to_unit_tensor(apply_placement(red, placement, interpolation))


def place_alpha(alpha: Image.Image | None, placement: Placement, interpolation: str | None = None) -> torch.Tensor:
    """An image's alpha channel (from `images.load_image_and_alpha`, decoded with the image itself) placed
    like the image, as (H, W) in [0, 1]; all ones when the image has no alpha."""
    if alpha is None:
        width, height = placement.box[2] - placement.box[0], placement.box[3] - placement.box[1]
        return torch.ones(height, width)
    return _to_unit_tensor(apply_placement(alpha, placement, interpolation))


def mask_to_latent(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Area-average a (B, H, W) or (B, 1, H, W) mask down to (B, 1, h, w) so it broadcasts over channels."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
    return F.interpolate(mask.float(), size=tuple(latent_hw), mode="area")
