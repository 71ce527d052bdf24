"""Latent caching in memory (`--cache_latents`) and to disk (`--cache_latents_to_disk`), and `run_cache`.

Caching encodes each distinct (image, bucket, flip) once, centre-cropped, in chunks that never mix buckets.
On disk every image's entry is written atomically as soon as it is encoded and valid entries are reused, so
stopping a run (or `lorakit cache`) and starting again only encodes what is left.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from lorakit.data.buckets import Size
from lorakit.data.images import crop_ltrb
from lorakit.data.latent_files import CacheRequest, LatentFileFormat, cache_path, is_valid, write_entry
from lorakit.errors import DataError

if TYPE_CHECKING:
    from lorakit.data.dataset import TrainDataset

logger = logging.getLogger(__name__)
Encode = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CacheReport:
    """How many images were encoded now and how many disk entries were already valid."""

    encoded: int
    reused: int


def check_cacheable(dataset: TrainDataset) -> None:
    """Caching fixes each image's pixels, so per-step colour jitter and random crops cannot be used."""
    bad = [f"{subset.source}: {name}" for subset in dataset.subsets
           for name in ("color_aug", "random_crop") if getattr(subset, name)]
    if bad:
        raise DataError("latents cannot be cached with color_aug or random_crop (they change the pixels "
                        "every step); turn them off or do not cache: " + "; ".join(bad))


def _split_by_bucket(jobs: list[tuple[Size, int]], batch_size: int) -> list[list[tuple[Size, int]]]:
    """Chunks of at most `batch_size` jobs, never mixing buckets (jobs are sorted by bucket)."""
    chunks: list[list[tuple[Size, int]]] = []
    for job in jobs:
        if chunks and chunks[-1][0][0] == job[0] and len(chunks[-1]) < max(1, batch_size):
            chunks[-1].append(job)
        else:
            chunks.append([job])
    return chunks


def _flips(dataset: TrainDataset, image_id: int) -> tuple[bool, ...]:
    return (False, True) if dataset.subsets[dataset.images[image_id].subset_index].flip_aug else (False,)


def _encode_chunk(dataset: TrainDataset, encode: Encode, chunk: list[tuple[Size, int]], flip: bool
                  ) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """{image id: (latent, alpha mask or None)} for one same-bucket chunk, flipped or not."""
    loaded = [dataset.centre_pixels(image_id, bucket, flip) for bucket, image_id in chunk]
    with torch.no_grad():
        latents = encode(torch.stack([pixels for pixels, _ in loaded])).detach().to("cpu")
    return {image_id: (latent, alpha) for (_, image_id), latent, (_, alpha) in zip(chunk, latents, loaded)}


def _request(dataset: TrainDataset, image_id: int, vae_id: str) -> CacheRequest:
    entry = dataset.images[image_id]
    subset = dataset.subsets[entry.subset_index]
    return CacheRequest(entry.path, entry.original_size, entry.choice.bucket, entry.choice.resized_size,
                        subset.flip_aug, subset.alpha_mask, vae_id)


def cache_dataset_latents(dataset: TrainDataset, encode: Encode, batch_size: int = 1, progress: bool = False,
                          to_disk: bool = False, latent_format: LatentFileFormat | None = None, vae_id: str = "",
                          skip_check: bool = False) -> CacheReport:
    """Encode the dataset's images; afterwards its batches carry latents (from RAM or from the npz files)."""
    from tqdm.auto import tqdm

    check_cacheable(dataset)
    if to_disk and latent_format is None:
        raise ValueError("caching latents to disk needs the model family's latent_format")
    fmt = latent_format
    jobs = sorted((entry.choice.bucket, image_id) for image_id, entry in enumerate(dataset.images))
    files = {i: cache_path(dataset.images[i].path, dataset.images[i].original_size, fmt) for _, i in jobs} if to_disk else {}
    reused = 0
    if to_disk:
        todo = [(b, i) for b, i in jobs if not is_valid(files[i], _request(dataset, i, vae_id), fmt, skip_check)]
        reused, jobs = len(jobs) - len(todo), todo
        if reused:
            logger.info("latent cache: %d of %d images already cached, %d to encode", reused, len(files), len(todo))
    memory: dict[tuple[int, bool], torch.Tensor] = {}
    alphas: dict[tuple[int, bool], torch.Tensor] = {}
    bar = tqdm(total=len(jobs), desc="caching latents", unit="img", disable=not progress)
    for chunk in _split_by_bucket(jobs, batch_size):
        encoded = {flip: _encode_chunk(dataset, encode, [j for j in chunk if flip in _flips(dataset, j[1])], flip)
                   for flip in (False, True) if any(flip in _flips(dataset, i) for _, i in chunk)}
        for bucket, image_id in chunk:
            results = {flip: done[image_id] for flip, done in encoded.items() if image_id in done}
            if to_disk:
                _write(dataset, image_id, bucket, results, files[image_id], fmt, vae_id)
                continue
            for flip, (latent, alpha) in results.items():
                memory[(image_id, flip)] = latent
                if alpha is not None:
                    alphas[(image_id, flip)] = alpha
        bar.update(len(chunk))
    bar.close()
    if to_disk:
        dataset.latent_files = {i: (path, fmt) for i, path in files.items()}
        dataset.latents = None
    else:
        dataset.latents, dataset.cached_alpha = memory, alphas
    return CacheReport(len(jobs), reused)


def _write(dataset: TrainDataset, image_id: int, bucket: Size, results: dict[bool, Any], path: Any,
           fmt: LatentFileFormat, vae_id: str) -> None:
    """One npz entry: plain and flipped latents, the crop and the (unflipped) alpha mask."""
    latent, alpha = results[False]
    flipped = results[True][0] if True in results else None
    write_entry(path, _request(dataset, image_id, vae_id), fmt, latent,
                crop_ltrb(bucket, dataset.images[image_id].original_size), flipped, alpha)


def vae_identity(cfg: Any) -> str:
    """The `vae_id` caches record: --vae, else the base model (`lorakit cache` and training must agree)."""
    return str(cfg.vae or cfg.pretrained_model_name_or_path)


def run_cache(cfg: Any, encode: Encode, latent_format: LatentFileFormat, vae_id: str = "",
              progress: bool = True, dataset: TrainDataset | None = None) -> CacheReport:
    """Cache all latents of the dataset described by `cfg` (built here unless given) to disk (`lorakit cache`).

    `encode` maps pixels (B, 3, H, W) in [-1, 1] to model-ready latents; `latent_format` is the model family's
    cache file format; `vae_id` names the VAE so caches made with another VAE are re-encoded.
    """
    from lorakit.data.build import build_train_dataset

    dataset = dataset if dataset is not None else build_train_dataset(cfg)
    return cache_dataset_latents(dataset, encode, getattr(cfg, "vae_batch_size", None) or 1, progress,
                                 to_disk=True, latent_format=latent_format, vae_id=vae_id,
                                 skip_check=bool(getattr(cfg, "skip_cache_check", False)))
