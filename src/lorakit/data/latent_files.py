"""Latent cache files with sd-scripts' names and npz keys, so caches move between the two tools (§9.4).

Path: `<image without extension>_<W:04d>x<H:04d><suffix>`, W x H the original image size. Single-resolution
files hold `latents`, `original_size`, `crop_ltrb`, optionally `latents_flipped` and `alpha_mask`;
multi-resolution ones hold the same keys suffixed `_<h>x<w>` (latent units) so one file keeps several bucket
sizes. Each model family gives its `LatentFileFormat` (suffix, layout and stored value convention).

Files store latents in sd-scripts' convention (`LatentFileFormat.to_file`). We add `lorakit_*` keys that
sd-scripts ignores: the image's size+mtime and SHA-256, the resize target and the VAE identity. A file is
stale when any of them, the bucket (latent shape) or the flip/mask keys no longer match; files without our
keys (written by sd-scripts) are checked by shape and keys only.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorakit.atomic import staged_file
from lorakit.data.buckets import Size


@dataclass(frozen=True)
class LatentFileFormat:
    """A family's cache file suffix and the map between model latents and stored values."""

    suffix: str
    multi_resolution: bool
    scale: float = 1.0
    shift: float = 0.0

    def to_file(self, latents: torch.Tensor) -> np.ndarray:
        """Model-ready (scaled) latents -> the values sd-scripts stores."""
        return (latents.float() / self.scale + self.shift).cpu().numpy()

    def from_file(self, array: np.ndarray) -> torch.Tensor:
        """Stored values -> model-ready latents."""
        return (torch.from_numpy(np.asarray(array, dtype=np.float32)) - self.shift) * self.scale



@dataclass(frozen=True)
class CacheRequest:
    """What one image's cache entry must contain."""

    image: Path
    original_size: Size  # (width, height)
    bucket: Size
    resized_size: Size
    flip: bool
    alpha_mask: bool
    vae_id: str = ""


def cache_path(image: Path, original_size: Size, fmt: LatentFileFormat) -> Path:
    """sd-scripts' cache file name for an image of `original_size`."""
    stem = image.with_suffix("")
    return Path(f"{stem}_{original_size[0]:04d}x{original_size[1]:04d}{fmt.suffix}")


def key_suffix(bucket: Size, fmt: LatentFileFormat) -> str:
    """`_<h>x<w>` in latent units for multi-resolution formats, else nothing."""
    return f"_{bucket[1] // 8}x{bucket[0] // 8}" if fmt.multi_resolution else ""


def image_stat(path: Path) -> str:
    info = path.stat()
    return f"{info.st_size}:{info.st_mtime_ns}"


def image_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read(path: Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray] | None:
    """The arrays of an npz file (only `keys` that it holds, when given), or None when it is missing or
    unreadable (a half-written file). npz members load lazily, so naming the keys reads only those."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files if keys is None or key in keys}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def _same_image(stored: dict[str, np.ndarray], image: Path) -> bool:
    """True when the stored fingerprint matches the image (or there is none to compare)."""
    if "lorakit_image_sha256" not in stored:
        return True
    if "lorakit_image_stat" in stored and str(stored["lorakit_image_stat"]) == image_stat(image):
        return True
    return str(stored["lorakit_image_sha256"]) == image_sha256(image)


def is_valid(path: Path, request: CacheRequest, fmt: LatentFileFormat, skip_check: bool = False) -> bool:
    """Whether `path` holds a usable entry for `request` (see the module docstring for the rules)."""
    if not path.is_file():
        return False
    if skip_check:
        return True
    s = key_suffix(request.bucket, fmt)
    needed = [f"latents{s}"] + ([f"latents_flipped{s}"] if request.flip else [])
    needed += [f"alpha_mask{s}"] if request.alpha_mask else []
    # this bucket's entry and the fingerprints only: a multi-resolution file's other buckets are not read
    stored = _read(path, (*needed, f"lorakit_resized{s}", "lorakit_vae", "lorakit_image_stat", "lorakit_image_sha256"))
    if stored is None:
        return False
    if any(key not in stored for key in needed):
        return False
    if tuple(stored[f"latents{s}"].shape[-2:]) != (request.bucket[1] // 8, request.bucket[0] // 8):
        return False
    resized = stored.get(f"lorakit_resized{s}")
    if resized is not None and tuple(int(v) for v in resized) != tuple(request.resized_size):
        return False
    vae = stored.get("lorakit_vae")
    if vae is not None and request.vae_id and str(vae) != request.vae_id:
        return False
    return _same_image(stored, request.image)


def write_entry(path: Path, request: CacheRequest, fmt: LatentFileFormat, latents: torch.Tensor,
                crop: tuple[int, int, int, int], flipped: torch.Tensor | None = None,
                alpha: torch.Tensor | None = None) -> None:
    """Write (or, for multi-resolution formats, merge) one entry atomically: temp file, then rename."""
    s = key_suffix(request.bucket, fmt)
    arrays = (_read(path) or {}) if fmt.multi_resolution else {}
    arrays[f"latents{s}"] = fmt.to_file(latents)
    arrays[f"original_size{s}"] = np.array(request.original_size, dtype=np.int64)
    arrays[f"crop_ltrb{s}"] = np.array(crop, dtype=np.int64)
    arrays[f"lorakit_resized{s}"] = np.array(request.resized_size, dtype=np.int64)
    if flipped is not None:
        arrays[f"latents_flipped{s}"] = fmt.to_file(flipped)
    if alpha is not None:
        arrays[f"alpha_mask{s}"] = alpha.float().cpu().numpy()
    arrays["lorakit_image_stat"] = np.array(image_stat(request.image))
    arrays["lorakit_image_sha256"] = np.array(image_sha256(request.image))
    arrays["lorakit_vae"] = np.array(request.vae_id)
    with staged_file(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def read_entry(path: Path, bucket: Size, fmt: LatentFileFormat, flip: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Model-ready latents (flipped ones when `flip`) and the alpha mask, if stored."""
    s = key_suffix(bucket, fmt)
    # read per batch during training: only this bucket's latents and mask, not the file's other entries
    stored = _read(path, (f"latents_flipped{s}" if flip else f"latents{s}", f"alpha_mask{s}"))
    if stored is None:
        raise OSError(f"latent cache {path} cannot be read")
    latents = fmt.from_file(stored[f"latents_flipped{s}" if flip else f"latents{s}"])
    alpha = stored.get(f"alpha_mask{s}")
    return latents, None if alpha is None else torch.from_numpy(np.asarray(alpha, dtype=np.float32))
