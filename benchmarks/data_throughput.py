"""Data pipeline throughput: images/s from disk to a batch, cached-latent batches/s, and whether a loader
with 2 workers keeps ahead of a tiny-model training step.

Run: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/data_throughput.py` (under a minute on 2 CPU cores).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from lorakit.data.build import build_train_dataset
from lorakit.data.cache import cache_dataset_latents

NUM_IMAGES = 48
BATCH = 4


def make_dataset(root: Path) -> SimpleNamespace:
    folder = root / "train" / "1_bench"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = [(512, 512), (640, 384), (384, 640)]
    for i in range(NUM_IMAGES):
        w, h = sizes[i % 3]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
        (folder / f"{i}.txt").write_text("a, b, c, d, e", encoding="utf-8")
    return SimpleNamespace(train_data_dir=str(root / "train"), resolution=(256, 256), train_batch_size=BATCH,
                           enable_bucket=True, min_bucket_reso=128, max_bucket_reso=512, bucket_reso_steps=64,
                           caption_extension=".txt", flip_aug=True, shuffle_caption=True, seed=0)


def tiny_model() -> torch.nn.Module:
    """A small conv net standing in for a training step's compute (forward + backward + AdamW)."""
    return torch.nn.Sequential(torch.nn.Conv2d(4, 64, 3, padding=1), torch.nn.SiLU(),
                               torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.SiLU(),
                               torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.SiLU(),
                               torch.nn.Conv2d(64, 4, 3, padding=1))


def encode(pixels: torch.Tensor) -> torch.Tensor:
    """A stand-in VAE: 8x average pooling to 4 channels (caching speed is not what is measured here)."""
    return torch.nn.functional.avg_pool2d(pixels, 8).repeat(1, 2, 1, 1)[:, :4] * 0.18215


def timed(loader) -> tuple[int, int, float]:
    start = time.perf_counter()
    batches = images = 0
    for batch in loader:
        batches += 1
        images += len(batch)
    return batches, images, time.perf_counter() - start


def step_time(model: torch.nn.Module, optimizer, latents: torch.Tensor, repeats: int = 10) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        loss = model(latents).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / repeats


def overlapped(ds, model, optimizer) -> tuple[float, float]:
    """(wait for an epoch's first batch, mean wait for each later batch), persistent workers, after a warm-up epoch.

    The first batch of an epoch cannot be prefetched (its order is drawn when the epoch starts); the steady
    wait is what says whether the loader keeps ahead of the step.
    """
    loader = ds.make_loader(2, persistent=True)
    for _ in loader:  # starts the workers
        pass
    ds.set_epoch(2)
    waits = []
    iterator = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            break
        waits.append(time.perf_counter() - start)
        step_time(model, optimizer, torch.randn(len(batch), 4, 32, 32), repeats=1)
    return waits[0], sum(waits[1:]) / max(1, len(waits) - 1)


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_dataset(Path(tmp))
        ds = build_train_dataset(cfg)
        ds.set_epoch(1)
        for workers in (0, 2):
            batches, images, seconds = timed(ds.make_loader(workers))
            print(f"disk -> batch, {workers} workers: {images / seconds:8.1f} images/s ({batches} batches)")
        model = tiny_model()
        optimizer = torch.optim.AdamW(model.parameters())
        latents = torch.randn(BATCH, 4, 32, 32)
        step = step_time(model, optimizer, latents)
        print(f"tiny training step (batch {BATCH}, 32x32 latents): {step * 1000:8.1f} ms")
        first, steady = overlapped(ds, model, optimizer)
        print(f"loader with 2 workers, training alongside: data wait {steady * 1000:.1f} ms per step after the first "
              f"(0 means the loader keeps ahead of the step); {first * 1000:.1f} ms for the epoch's first batch")
        cache_dataset_latents(ds, encode, batch_size=8)
        batches, _, seconds = timed(ds.make_loader(0))
        print(f"cached latents: {batches / seconds:8.1f} batches/s")


if __name__ == "__main__":
    main()
