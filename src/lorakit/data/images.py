"""Reading images and fitting them to their bucket: resize to cover, then crop (inventory §3.5).

Every failure to read an image (missing, corrupt, unsupported, absurdly large) is a `DataError` that names
the file, so the user sees which file to fix instead of a PIL traceback.
"""

from __future__ import annotations

import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lorakit.data.buckets import Size
from lorakit.errors import DataError

# EXIF orientations that rotate by 90 or 270 degrees, i.e. swap width and height.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


@contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """Open an image, turning PIL's decompression-bomb warning and read failures into `DataError`s."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                yield img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"image {path} is too large to load safely (more than {Image.MAX_IMAGE_PIXELS} "
                        "pixels); shrink it before training") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"image {path} cannot be read ({err.__class__.__name__}: {err}); "
                        "it may be corrupt or not an image") from None


def image_size(path: str | Path) -> Size:
    """(width, height) as the image will be seen after EXIF orientation, reading only the header."""
    with _opened(Path(path)) as img:
        width, height = img.size
        orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


def decode_check(path: str | Path) -> None:
    """Decode the whole file (a header read passes a truncated JPEG); a `DataError` naming it when that fails."""
    with _opened(Path(path)) as img:
        img.load()


def _decode(path: Path) -> Image.Image:
    """Decode fully with EXIF orientation applied; 16-bit greyscale is scaled down to 8 bits."""
    with _opened(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit greyscale: scale to 8 bits first, RGB conversion of these modes clips.
            array = np.asarray(img, dtype=np.float32) / (256.0 if np.asarray(img).max() > 255 else 1.0)
            img = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L")
        return img


def load_image(path: str | Path) -> Image.Image:
    """Decode an image fully as RGB with EXIF orientation applied; alpha is dropped, as sd-scripts does."""
    return _decode(Path(path)).convert("RGB")


def load_image_and_alpha(path: str | Path) -> tuple[Image.Image, Image.Image | None]:
    """RGB image and its alpha channel ("L"), or None when the file has no transparency."""
    img = _decode(Path(path))
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    alpha = img.convert("RGBA").getchannel("A") if has_alpha else None
    return img.convert("RGB"), alpha


_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR, "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX, "box": Image.Resampling.BOX,
}


def resize_to(img: Image.Image, size: Size, interpolation: str | None = None) -> Image.Image:
    """Resize to `size` with the named filter; by default box (area average) when shrinking, else Lanczos."""
    if img.size == tuple(size):
        return img
    if interpolation:
        return img.resize(size, _FILTERS[interpolation])
    shrinking = size[0] <= img.width and size[1] <= img.height
    method = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
    return img.resize(size, method)


@dataclass(frozen=True)
class Placement:
    """How a source image maps onto its bucket: resize to `resized`, crop `box` (l, t, r, b), then flip.

    Image and mask go through the same placement, so they stay aligned.
    """

    resized: Size
    box: tuple[int, int, int, int]
    flip: bool = False


def bucket_placement(bucket: Size, resized_size: Size, random_crop: bool = False,
                     rng: random.Random | None = None, flip: bool = False) -> Placement:
    """Resize to cover `bucket` (never smaller than it) and crop, centred or at a random offset."""
    target = (max(resized_size[0], bucket[0]), max(resized_size[1], bucket[1]))
    excess_w, excess_h = target[0] - bucket[0], target[1] - bucket[1]
    if random_crop:
        rng = rng or random.Random()
        left, top = rng.randint(0, excess_w), rng.randint(0, excess_h)
    else:
        left, top = excess_w // 2, excess_h // 2
    return Placement(target, (left, top, left + bucket[0], top + bucket[1]), flip)


def apply_placement(img: Image.Image, placement: Placement, interpolation: str | None = None) -> Image.Image:
    """Resize, crop and flip one image (or mask) as `placement` says."""
    out = resize_to(img, placement.resized, interpolation).crop(placement.box)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if placement.flip else out


def size_condition_crop(bucket: Size, original: Size, flipped: bool) -> tuple[int, int]:
    """The (top, left) crop value sd-scripts conditions on (SDXL's size conditioning).

    sd-scripts computes it from the image *fitted inside* the bucket (not from the real crop), and ignores
    random crops; we reproduce that so LoRAs trained here condition the model the same way.
    """
    bucket_w, bucket_h = bucket
    image_ar = original[0] / original[1]
    if bucket_w / bucket_h > image_ar:
        fitted_w, fitted_h = bucket_h * image_ar, float(bucket_h)
    else:
        fitted_w, fitted_h = float(bucket_w), bucket_w / image_ar
    left = (bucket_w - fitted_w) // 2
    top = (bucket_h - fitted_h) // 2
    if flipped:
        left = bucket_w - (left + fitted_w)
    return int(top), int(left)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def crop_ltrb(bucket: Size, original: Size, flipped: bool = False) -> tuple[int, int, int, int]:
    """sd-scripts' `crop_ltrb` cache value: the image fitted inside the bucket, as (left, top, right, bottom)."""
    top, left = size_condition_crop(bucket, original, flipped)
    image_ar = original[0] / original[1]
    if bucket[0] / bucket[1] > image_ar:
        fitted = (int(bucket[1] * image_ar), bucket[1])
    else:
        fitted = (bucket[0], int(bucket[0] / image_ar))
    return left, top, left + fitted[0], top + fitted[1]
