"""Aspect-ratio bucketing, with the same bucket choices as sd-scripts (inventory §3.5).

Sizes are (width, height) here, as in sd-scripts; the batch turns them into (height, width) for the model.
An image is resized so that it *covers* its bucket (keeping its aspect ratio) and the excess is cropped,
so buckets are never padded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

logger = logging.getLogger(__name__)

Size = tuple[int, int]


@dataclass(frozen=True)
class BucketChoice:
    """Where an image of a given size goes: its bucket, the size it is resized to, and the AR mismatch."""

    bucket: Size
    resized_size: Size
    ar_error: float


def make_bucket_resolutions(max_reso: Size, min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[Size]:
    """All bucket sizes with area at most max_reso's, sides in [min_size, max_size], multiples of `divisible`.

    The square bucket of the same area is always included; the list is sorted.
    """
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def round_to_steps(x: float, steps: int) -> int:
    """Round to the nearest integer, then down to a multiple of `steps`."""
    value = int(x + 0.5)
    return value - value % steps


def adjust_bucket_limits(min_reso: int, max_reso: int, steps: int) -> tuple[int, int]:
    """Round min_bucket_reso down and max_bucket_reso up to multiples of `steps`, warning when changed."""
    if min_reso % steps:
        adjusted = min_reso - min_reso % steps
        logger.warning("min_bucket_reso %d is not a multiple of bucket_reso_steps %d; using %d",
                       min_reso, steps, adjusted)
        min_reso = adjusted
    if max_reso % steps:
        adjusted = max_reso + steps - max_reso % steps
        logger.warning("max_bucket_reso %d is not a multiple of bucket_reso_steps %d; using %d",
                       max_reso, steps, adjusted)
        max_reso = adjusted
    return min_reso, max_reso


def cover_size(width: int, height: int, bucket: Size) -> Size:
    """Size that keeps the image's aspect ratio and covers `bucket` (the excess is cropped later)."""
    if width / height > bucket[0] / bucket[1]:  # wider than the bucket: match heights
        scale = bucket[1] / height
    else:
        scale = bucket[0] / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def select_predefined_bucket(width: int, height: int, resos: list[Size]) -> BucketChoice:
    """Upscaling allowed: an exact bucket match, else the bucket with the closest aspect ratio (first on ties)."""
    aspect = width / height
    if (width, height) in resos:
        bucket = (width, height)
    else:
        bucket = min(resos, key=lambda r: abs(r[0] / r[1] - aspect))  # min() keeps the first on ties
    return BucketChoice(bucket, cover_size(width, height, bucket), bucket[0] / bucket[1] - aspect)


def _ratio(width: int, height: int) -> float:
    return width / height if height else math.inf


def no_upscale_resized_size(width: int, height: int, max_area: int, steps: int) -> Size:
    """`bucket_no_upscale`: shrink images larger than max_area so one side lands on a multiple of steps."""
    if width * height <= max_area:
        return width, height
    aspect = width / height
    resized_w = math.sqrt(max_area * aspect)
    resized_h = max_area / resized_w
    w_rounded = round_to_steps(resized_w, steps)
    ar_from_width = _ratio(w_rounded, round_to_steps(w_rounded / aspect, steps))
    h_rounded = round_to_steps(resized_h, steps)
    ar_from_height = _ratio(round_to_steps(h_rounded * aspect, steps), h_rounded)
    if abs(ar_from_width - aspect) < abs(ar_from_height - aspect):
        return w_rounded, int(w_rounded / aspect + 0.5)
    return int(h_rounded * aspect + 0.5), h_rounded


def select_no_upscale_bucket(width: int, height: int, max_area: int, steps: int) -> BucketChoice:
    """`bucket_no_upscale`: the bucket is the (possibly shrunk) size floored to multiples of steps."""
    resized = no_upscale_resized_size(width, height, max_area, steps)
    bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    ar_error = _ratio(*bucket) - width / height if bucket[1] else math.inf
    return BucketChoice(bucket, resized, ar_error)


class BucketManager:
    """Chooses buckets for one dataset and counts the images in each.

    Without bucketing there is a single bucket, `resolution`, and every image is resized to cover it.
    """

    def __init__(self, resolution: Size, enable_bucket: bool = False, no_upscale: bool = False,
                 min_reso: int = 256, max_reso: int = 1024, steps: int = 64):
        self.resolution = resolution
        self.enable_bucket = enable_bucket
        self.no_upscale = enable_bucket and no_upscale
        self.steps = steps
        self.min_reso, self.max_reso = min_reso, max_reso  # the limits in use (rounded to the steps)
        self.max_area = resolution[0] * resolution[1]
        if not enable_bucket:
            self.predefined: list[Size] = [resolution]
        elif self.no_upscale:
            self.predefined = []
        else:
            self.predefined = make_bucket_resolutions(resolution, min_reso, max_reso, steps)

    def select(self, width: int, height: int) -> BucketChoice:
        """The bucket for an image of (width, height)."""
        if self.no_upscale:
            return select_no_upscale_bucket(width, height, self.max_area, self.steps)
        return select_predefined_bucket(width, height, self.predefined)

    def bucket_order(self, used: set[Size]) -> list[Size]:
        """Buckets in the order sd-scripts numbers them: all predefined ones sorted, or the used ones sorted."""
        return sorted(used) if self.no_upscale else sorted(set(self.predefined) | used)
