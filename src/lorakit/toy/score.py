"""Pixel-statistics scorer for the toy world's held-out concept (a magenta shape).

`concept_score(images)` is the fraction of images that contain a magenta blob of plausible size. A pixel counts as
magenta when its hue lies within +-25 degrees of 300 (the base colours sit at 0, 50, 128 and 230 degrees), its HSV
saturation is at least 0.4 and its value at least 0.3 (so greys, near-black and washed-out pixels never count). The
pixel mask is then cleaned with a 3x3 majority filter, which removes isolated pixels (noise) and one-pixel lines
(blended edges) but keeps the inside of any shape. An image contains the concept when the largest connected region
of the cleaned mask covers at least `MIN_AREA` of the image and the whole mask at most `MAX_AREA`: the smallest
drawn shape covers about 2 %, the largest about 27 %, and a frame that is mostly magenta is a colour wash, not a
magenta shape.

Calibration (tests/test_toy_world.py): rendered concept images score 1.0, rendered base images, uniform noise and
flat grey score 0.0.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np
import torch
from PIL import Image

TARGET_HUE = 300.0  # degrees; the hue of PALETTE["magenta"]
HUE_TOLERANCE = 25.0
MIN_SATURATION = 0.4
MIN_VALUE = 0.3
MIN_AREA = 0.006  # fraction of the image
MAX_AREA = 0.6


def _to_arrays(images: Sequence[Image.Image] | torch.Tensor, value_range: tuple[float, float]) -> list[np.ndarray]:
    """Float RGB arrays in [0, 1] of shape (H, W, 3), from PIL images or an (N, 3, H, W) / (3, H, W) tensor."""
    if isinstance(images, torch.Tensor):
        batch = images.detach().float().cpu()
        if batch.ndim == 3:
            batch = batch.unsqueeze(0)
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, H, W) tensor, got shape {tuple(images.shape)}")
        low, high = value_range
        batch = ((batch - low) / (high - low)).clamp(0, 1)
        return list(batch.permute(0, 2, 3, 1).numpy())
    return [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]


def hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), saturation and value in [0, 1], of an (H, W, 3) RGB array in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    delta = high - low
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(high == r, (g - b) / safe % 6, np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = np.where(delta > 0, hue * 60.0, 0.0)
    saturation = np.where(high > 0, delta / np.where(high > 0, high, 1.0), 0.0)
    return hue, saturation, high


def concept_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of magenta pixels after the 3x3 majority filter."""
    hue, saturation, value = hsv(rgb)
    distance = np.abs((hue - TARGET_HUE + 180.0) % 360.0 - 180.0)
    raw = (distance <= HUE_TOLERANCE) & (saturation >= MIN_SATURATION) & (value >= MIN_VALUE)
    padded = np.pad(raw.astype(np.int32), 1)
    h, w = raw.shape
    neighbours = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    return neighbours >= 5


def largest_component(mask: np.ndarray) -> int:
    """Pixel count of the largest 4-connected region of a boolean mask (breadth-first search)."""
    h, w = mask.shape
    unseen = set(zip(*np.nonzero(mask)))
    best = 0
    while unseen:
        queue = deque([unseen.pop()])
        size = 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for neighbour in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if neighbour in unseen:
                    unseen.remove(neighbour)
                    queue.append(neighbour)
        best = max(best, size)
    return best


def concept_present(rgb: np.ndarray) -> bool:
    """Whether one (H, W, 3) image in [0, 1] holds a magenta blob of plausible size.

    The largest connected magenta region must reach MIN_AREA (a shape, not scattered specks) while all magenta
    together stays under MAX_AREA (a shape, not a tinted frame).
    """
    mask = concept_mask(rgb)
    if mask.mean() > MAX_AREA:
        return False
    return largest_component(mask) >= MIN_AREA * mask.size


def concept_score(images: Sequence[Image.Image] | torch.Tensor, *, value_range: tuple[float, float] = (0.0, 1.0)) -> float:
    """Fraction in [0, 1] of `images` that show the held-out concept (a magenta shape).

    `images` is a list of PIL images or an (N, 3, H, W) tensor whose values span `value_range` ((0, 1) as
    diffusers' `output_type="pt"` gives; pass (-1, 1) for raw VAE decodes). An empty input scores 0.
    """
    arrays = _to_arrays(images, value_range)
    if not arrays:
        return 0.0
    return sum(concept_present(a) for a in arrays) / len(arrays)
