"""`lorakit dataset canny`: Canny edge images for ControlNet conditioning (sd-scripts `tools/canny.py`, which calls
OpenCV's `cv2.Canny(gray, 32, 224)`).

The same algorithm as OpenCV's (Canny 1986, "A Computational Approach to Edge Detection"), in numpy so that no
OpenCV wheel is needed: grey levels with OpenCV's fixed-point BGR->grey weights, 3x3 Sobel gradients with the
border replicated, the L1 gradient magnitude |gx| + |gy|, non-maximum suppression along the gradient direction
quantised to 0/45/90/135 degrees (with OpenCV's tie rule: strictly greater than the neighbour before, at
least the neighbour after, on horizontal and vertical edges), then hysteresis: pixels above `high` are edges,
and pixels above `low` joined to an edge through 8-connected neighbours above `low` are edges too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# tan(22.5 degrees) in OpenCV's 15-bit fixed point; tan(67.5) = tan(22.5) + 2 (compared exactly, in integers)
_TAN_22_5_Q15 = 13573
_ONE_Q15 = 1 << 15


def grey_levels(rgb: np.ndarray) -> np.ndarray:
    """uint8 grey from an HxWx3 RGB array: weights 0.299/0.587/0.114 in OpenCV's 15-bit fixed point (its
    COLOR_BGR2GRAY gives the same value for every colour)."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((r * 9798 + g * 19235 + b * 3735 + (1 << 14)) >> 15).astype(np.uint8)


def sobel(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gx, gy) of the 3x3 Sobel operator with the border pixels replicated."""
    p = np.pad(grey.astype(np.int32), 1, mode="edge")
    rows = p[:-2] + 2 * p[1:-1] + p[2:]   # vertical smoothing, then the horizontal difference
    gx = rows[:, 2:] - rows[:, :-2]
    cols = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]
    gy = cols[2:] - cols[:-2]
    return gx, gy


def _neighbour(magnitude: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """magnitude[y + dy, x + dx] for every pixel, 0 outside the image."""
    padded = np.pad(magnitude, 1)
    height, width = magnitude.shape
    return padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]


def thin_edges(gx: np.ndarray, gy: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """Non-maximum suppression: True where the magnitude is a maximum across the edge."""
    ax, ay = np.abs(gx).astype(np.int64), np.abs(gy).astype(np.int64) * _ONE_Q15
    horizontal_gradient = ay < ax * _TAN_22_5_Q15
    vertical_gradient = ay > ax * (_TAN_22_5_Q15 + 2 * _ONE_Q15)
    diagonal = ~horizontal_gradient & ~vertical_gradient
    same_sign = (gx ^ gy) >= 0  # gradient along y = x (in image rows: down-right)
    keep = horizontal_gradient & (magnitude > _neighbour(magnitude, 0, -1)) & (magnitude >= _neighbour(magnitude, 0, 1))
    keep |= vertical_gradient & (magnitude > _neighbour(magnitude, -1, 0)) & (magnitude >= _neighbour(magnitude, 1, 0))
    down_right = (magnitude > _neighbour(magnitude, -1, -1)) & (magnitude > _neighbour(magnitude, 1, 1))
    down_left = (magnitude > _neighbour(magnitude, -1, 1)) & (magnitude > _neighbour(magnitude, 1, -1))
    keep |= diagonal & np.where(same_sign, down_right, down_left)
    return keep


def follow_edges(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Hysteresis: `strong` pixels plus the `weak` ones 8-connected to them (breadth-first, one ring per step)."""
    height, width = strong.shape
    stride = width + 2
    candidate = np.zeros((height + 2) * stride, dtype=bool)  # a border of False pixels stops the search
    candidate.reshape(height + 2, stride)[1:-1, 1:-1] = weak | strong
    edge = np.zeros_like(candidate)
    frontier = np.flatnonzero(np.pad(strong, 1).ravel())
    edge[frontier] = True
    offsets = np.array([dy * stride + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
    while frontier.size:
        around = np.unique((frontier[:, None] + offsets[None, :]).ravel())
        frontier = around[candidate[around] & ~edge[around]]
        edge[frontier] = True
    return edge.reshape(height + 2, stride)[1:-1, 1:-1]


def canny(rgb: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint8 edge image (255 on edges, 0 elsewhere) of an HxWx3 RGB uint8 array."""
    gx, gy = sobel(grey_levels(rgb))
    magnitude = np.abs(gx) + np.abs(gy)
    thin = thin_edges(gx, gy, magnitude)
    # OpenCV compares the integer L1 magnitude with the thresholds rounded down
    low_level, high_level = int(np.floor(low)), int(np.floor(high))
    weak = thin & (magnitude > low_level)
    strong = weak & (magnitude > high_level)
    return np.where(follow_edges(strong, weak), 255, 0).astype(np.uint8)


def _write_edges(image_path: Path, output: Path, low: float, high: float) -> None:
    from lorakit.atomic import staged_file
    from lorakit.data.images import load_image

    edges = canny(np.asarray(load_image(image_path)), low, high)
    with staged_file(output) as tmp:
        Image.fromarray(edges, "L").save(tmp, format=Image.registered_extensions().get(output.suffix.lower(), "PNG"))


def edge_images(source: Path, target: Path, low: float, high: float, recursive: bool = False) -> int:
    """Edge images of one image (written to `target`) or of every image of a folder (as PNGs of the same names
    under `target`, so a ControlNet subset's conditioning images pair up with its images); returns how many."""
    from lorakit.prep.files import find_images, warn_skipped

    if source.is_file():
        _write_edges(source, target, low, high)
        return 1
    written = 0
    for image in find_images(source, recursive):
        output = (target / image.relative_to(source)).with_suffix(".png")
        output.parent.mkdir(parents=True, exist_ok=True)
        try:
            _write_edges(image, output, low, high)
        except Exception as err:  # noqa: BLE001 - an unreadable image is reported and skipped
            warn_skipped(image, f"cannot read the image ({err})")
            continue
        written += 1
    return written
