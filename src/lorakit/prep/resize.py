"""`lorakit dataset resize`: copies of a folder's images scaled down to several pixel budgets (sd-scripts
`tools/resize_images_to_resolution.py`).

For each `WxH` in `--max_resolution`, an image with more than W*H pixels is scaled (aspect ratio kept) to at
most W*H pixels; then both sides are cut down to a multiple of `--divisible_by` by a centred crop. The copy is
saved as `<name>+WxH.jpg` (quality 100) or `.png`. Other files of the folder are copied unchanged, and with
`--copy_associated_files` each image's own files (same name, another extension: captions, tags) are also copied
as `<name>+WxH<ext>`, so each resized copy keeps its caption.

Where this differs from sd-scripts: every size is made from the original image (sd-scripts scales the previous
size again), width and height are not swapped for non-square images (sd-scripts passes them to its resize
helper in the wrong order), and subfolders are skipped instead of stopping the run.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lorakit.prep.files import is_image_file

logger = logging.getLogger("lorakit.prep")

INTERPOLATIONS = ("area", "cubic", "lanczos4", "nearest", "linear", "box")
_PIL_FILTER_NAMES = {"lanczos4": "lanczos"}  # sd-scripts' OpenCV name -> lorakit.data.images' name
_RESOLUTION = re.compile(r"\s*(\d+)\s*x\s*(\d+)\s*")


def parse_resolutions(text: str) -> list[tuple[int, int]]:
    """`"512x512, 384x384"` -> [(512, 512), (384, 384)]; ValueError names the first malformed entry."""
    sizes = []
    for part in text.split(","):
        match = _RESOLUTION.fullmatch(part)
        if not match or int(match[1]) < 1 or int(match[2]) < 1:
            raise ValueError(f"{part.strip()!r} is not WIDTHxHEIGHT with positive numbers")
        sizes.append((int(match[1]), int(match[2])))
    return sizes


def target_size(size: tuple[int, int], max_pixels: int, divisible_by: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(scaled size, final size after the crop to multiples of `divisible_by`) for an image of `size`."""
    width, height = size
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        width, height = int(width * scale), int(height * scale)
    return (width, height), (width - width % divisible_by, height - height % divisible_by)


def resized_copy(image: Image.Image, max_pixels: int, divisible_by: int, interpolation: str | None) -> Image.Image:
    from lorakit.data.images import resize_to

    scaled, final = target_size(image.size, max_pixels, divisible_by)
    if scaled != image.size:
        name = _PIL_FILTER_NAMES.get(interpolation, interpolation) if interpolation else None
        image = resize_to(image, scaled, name)
    left, top = (scaled[0] - final[0]) // 2, (scaled[1] - final[1]) // 2
    return image.crop((left, top, left + final[0], top + final[1]))


@dataclass(frozen=True)
class ResizeReport:
    images: int
    written: int
    copied: int
    skipped: list[Path]


def _save(image: Image.Image, path: Path) -> None:
    from lorakit.atomic import staged_file

    with staged_file(path) as tmp:
        image.save(tmp, format="PNG" if path.suffix == ".png" else "JPEG", **({} if path.suffix == ".png" else {"quality": 100}))


def _associated_files(image: Path) -> list[Path]:
    return sorted(p for p in image.parent.iterdir() if p.is_file() and p.stem == image.stem and not is_image_file(p))


def resize_folder(src: Path, dst: Path, resolutions: list[tuple[int, int]], divisible_by: int = 1,
                  interpolation: str | None = None, save_as_png: bool = False,
                  copy_associated_files: bool = False) -> ResizeReport:
    """Write the resized copies of every image of `src` (not its subfolders) into `dst`."""
    from lorakit.data.images import load_image

    dst.mkdir(parents=True, exist_ok=True)
    suffix = ".png" if save_as_png else ".jpg"
    images = written = copied = 0
    skipped: list[Path] = []
    for path in sorted(p for p in src.iterdir() if p.is_file()):
        if not is_image_file(path):
            shutil.copy2(path, dst / path.name)
            copied += 1
            continue
        try:
            image = load_image(path)
        except Exception as err:  # noqa: BLE001 - an unreadable image is reported and skipped
            logger.warning("skipped %s: cannot read the image (%s)", path, err)
            skipped.append(path)
            continue
        images += 1
        for width, height in resolutions:
            label = f"{width}x{height}"
            copy = resized_copy(image, width * height, divisible_by, interpolation)
            _save(copy, dst / f"{path.stem}+{label}{suffix}")
            written += 1
            logger.info("%s -> %s+%s%s (%dx%d)", path.name, path.stem, label, suffix, *copy.size)
            if copy_associated_files:
                for extra in _associated_files(path):
                    shutil.copy2(extra, dst / f"{path.stem}+{label}{extra.suffix}")
                    copied += 1
    return ResizeReport(images, written, copied, skipped)
