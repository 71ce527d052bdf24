"""Image augmentations: colour jitter (`color_aug`) and face-centred crops (`face_crop_aug_range`).

Both take an explicit `random.Random`, so a batch's seed fixes its augmentation in any worker process.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from lorakit.data.buckets import Size
from lorakit.data.images import Placement

COLOR_AUG_PROBABILITY = 0.33
# sd-scripts shifts hue by up to 8 units of OpenCV's 8-bit hue scale (0..179, i.e. 2 degrees per unit).
HUE_SHIFT_DEGREES = 16.0
GAMMA_RANGE = (0.95, 1.05)


def shift_hue(img: Image.Image, degrees: float) -> Image.Image:
    """Rotate the hue of an RGB image by `degrees` (saturation and value unchanged)."""
    hsv = np.asarray(img.convert("HSV"), dtype=np.int16).copy()
    hsv[..., 0] = (hsv[..., 0] + round(degrees * 256 / 360)) % 256  # PIL's hue runs over 0..255
    return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")


def apply_gamma(img: Image.Image, gamma: float) -> Image.Image:
    """Gamma on normalised values: out = 255 * (in / 255) ** gamma, through a lookup table."""
    table = np.clip(np.round(255.0 * (np.arange(256) / 255.0) ** gamma), 0, 255).astype(np.uint8)
    return Image.fromarray(table[np.asarray(img)], "RGB")


def color_augment(img: Image.Image, rng: random.Random) -> Image.Image:
    """sd-scripts' weak colour augmentation: with p=0.33, either a hue shift or a gamma change (50/50)."""
    if rng.random() >= COLOR_AUG_PROBABILITY:
        return img
    if rng.random() < 0.5:
        return shift_hue(img, rng.uniform(-HUE_SHIFT_DEGREES, HUE_SHIFT_DEGREES))
    return apply_gamma(img, rng.uniform(*GAMMA_RANGE))


def _face_scale(size: Size, target: Size, face_size: int, scale_range: tuple[float, float],
                rng: random.Random) -> float:
    """Scale so the face's larger side spans between target/hi and target/lo of the shorter target side.

    Never below the scale at which the image just covers the target, never above 1 (no upscaling).
    """
    short = min(target)
    cover = max(target[0] / size[0], target[1] / size[1])
    low = min(1.0, max(cover, short / (face_size * scale_range[1])))
    high = min(1.0, max(low, short / (face_size * scale_range[0])))
    return low if low >= high else rng.uniform(low, high)


def _face_offset(length: int, target: int, centre: int, face_size: int, jitter: bool, random_crop: bool,
                 rng: random.Random) -> int:
    """Start of the crop along one axis: the face centred, optionally moved, kept inside the image."""
    start = centre - target // 2
    if random_crop:
        # Triangular offset in [-reach, reach]: usually near the face, sometimes showing more background.
        reach = max(length - centre, centre)
        start += rng.randint(0, reach) + rng.randint(0, reach) - reach
    elif jitter:
        start += rng.randint(-(face_size // 20), face_size // 20)
    return max(0, min(start, length - target))


def face_crop_placement(size: Size, face: tuple[int, int, int, int], target: Size,
                        scale_range: tuple[float, float], random_crop: bool, rng: random.Random,
                        flip: bool = False) -> Placement:
    """Placement that scales the image by a random factor of the face size and crops around the face.

    `face` is (centre x, centre y, width, height) in source pixels; `target` is (width, height).
    """
    if tuple(size) == tuple(target):
        return Placement(size, (0, 0, size[0], size[1]), flip)
    face_size = max(face[2], face[3], 1)
    scale = _face_scale(size, target, face_size, scale_range, rng)
    resized = (max(target[0], int(size[0] * scale + 0.5)), max(target[1], int(size[1] * scale + 0.5)))
    centre = (int(face[0] * scale + 0.5), int(face[1] * scale + 0.5))
    # A little jitter only when a range is given and the face is big enough for it to matter.
    jitter = scale_range[0] != scale_range[1] and face_size > min(target) // 10 and face_size >= 40
    top = _face_offset(resized[1], target[1], centre[1], face_size, jitter, random_crop, rng)
    left = _face_offset(resized[0], target[0], centre[0], face_size, jitter, random_crop, rng)
    return Placement(resized, (left, top, left + target[0], top + target[1]), flip)
