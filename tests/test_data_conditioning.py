"""Conditioning datasets: pairs matched by file name, every problem at start-up, one placement for both images,
conditioning images in the batch (also with cached latents), and the training type's rule for using them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lorakit.data.build import build_train_dataset
from lorakit.data.cache import cache_dataset_latents
from lorakit.data.conditioning import ConditioningUse
from lorakit.errors import DataError

REQUIRED, OPTIONAL, MASK = ConditioningUse.REQUIRED, ConditioningUse.OPTIONAL, ConditioningUse.MASK


def options(**overrides) -> SimpleNamespace:
    values = dict(train_data_dir=None, reg_data_dir=None, dataset_config=None, in_json=None, resolution=(64, 64),
                  train_batch_size=2, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                  bucket_reso_steps=32, caption_extension=".txt", masked_loss=False, prior_loss_weight=1.0,
                  flip_aug=True, conditioning_data_dir=None)
    values.update(overrides)
    return SimpleNamespace(**values)


def noise_image(path: Path, size: tuple[int, int], seed: int) -> None:
    """A random picture: any misplacement (shift, flip, other scaling) of one of a pair shows in every pixel."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def pair_folders(tmp_path: Path, same: bool = True) -> tuple[Path, Path]:
    """Images of several shapes and their conditioning images (the same pictures when `same`)."""
    images, pairs = tmp_path / "images", tmp_path / "cond"
    for i, size in enumerate([(64, 64), (130, 40), (40, 100), (90, 70)]):
        noise_image(images / f"img{i}.png", size, i)
        noise_image(pairs / f"img{i}.jpg" if not same else pairs / f"img{i}.png", size, i if same else 100 + i)
        (images / f"img{i}.txt").write_text(f"caption {i}")
    return images, pairs


def test_pair_folders_deliver_conditioning_placed_like_the_image(tmp_path):
    images, pairs = pair_folders(tmp_path)
    ds = build_train_dataset(options(train_data_dir=str(images), conditioning_data_dir=str(pairs)), seed=3,
                             conditioning=REQUIRED)
    assert len(ds.images) == 4 and all(e.repeats == 1 for e in ds.images)
    assert len({e.choice.bucket for e in ds.images}) > 1
    flips_seen = set()
    for epoch in (1, 2, 3):
        ds.set_epoch(epoch)
        for batch in (ds[i] for i in range(len(ds))):
            assert batch.conditioning_images.shape == batch.images.shape
            assert batch.masks is None  # no --masked_loss: the conditioning image is not a loss mask
            torch.testing.assert_close(batch.conditioning_images, batch.images, rtol=0, atol=0)
            flips_seen.add(tuple(batch.crop_top_lefts))
    assert len(flips_seen) > 1


def test_conditioning_image_is_not_the_image(tmp_path):
    images, pairs = pair_folders(tmp_path, same=False)
    ds = build_train_dataset(options(train_data_dir=str(images), conditioning_data_dir=str(pairs), flip_aug=False),
                             conditioning=REQUIRED)
    by_name = {e.path.name: e.conditioning_path.name for e in ds.images}
    assert by_name == {f"img{i}.png": f"img{i}.jpg" for i in range(4)}  # matched by stem, any extension
    batch = ds[0]
    assert not torch.equal(batch.conditioning_images, batch.images)
    assert batch.conditioning_images.min() >= -1 and batch.conditioning_images.max() <= 1


def test_every_conditioning_problem_named_at_once(tmp_path):
    images, pairs = pair_folders(tmp_path)
    (pairs / "img0.png").unlink()  # missing
    (pairs / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # unreadable
    noise_image(pairs / "img2.png", (41, 100), 9)  # wrong size
    noise_image(pairs / "stray.png", (10, 10), 9)  # no image of that name
    with pytest.raises(DataError) as info:
        build_train_dataset(options(train_data_dir=str(images), conditioning_data_dir=str(pairs)),
                            conditioning=REQUIRED)
    text = str(info.value)
    assert "4 problem(s)" in text
    assert "img0.png has no conditioning image" in text
    assert "img1.png cannot be read" in text
    assert "img2.png is 41x100 but its image" in text
    assert "stray.png has no training image" in text


def test_required_conditioning_options_and_config(tmp_path):
    with pytest.raises(DataError, match="--conditioning_data_dir is required"):
        build_train_dataset(options(train_data_dir=str(tmp_path)), conditioning=REQUIRED)
    images, pairs = pair_folders(tmp_path)
    config = tmp_path / "d.toml"
    config.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{images}'\n"
                      f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{images}'\n"
                      f"conditioning_data_dir = '{pairs}'\nnum_repeats = 3\n")
    with pytest.raises(DataError, match=r"\[\[datasets\]\] #1 subset #1: conditioning_data_dir is required") as info:
        build_train_dataset(options(dataset_config=str(config)), conditioning=REQUIRED)
    assert "#2" not in str(info.value)
    config.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{images}'\n"
                      f"conditioning_data_dir = '{pairs}'\nnum_repeats = 3\n")
    ds = build_train_dataset(options(dataset_config=str(config)), conditioning=REQUIRED)
    assert all(e.repeats == 3 for e in ds.images) and ds[0].conditioning_images is not None
    with pytest.raises(DataError, match="needs --masked_loss"):  # LoRA training, as sd-scripts: masks only
        build_train_dataset(options(dataset_config=str(config)), conditioning=MASK)
    assert build_train_dataset(options(dataset_config=str(config)), conditioning=OPTIONAL)[0].conditioning_images is not None


def test_masked_loss_takes_the_red_channel_of_the_placed_conditioning_image(tmp_path):
    images, pairs = pair_folders(tmp_path)
    ds = build_train_dataset(options(train_data_dir=str(images), conditioning_data_dir=str(pairs), masked_loss=True),
                             conditioning=REQUIRED)
    batch = ds[0]
    expected = torch.round((batch.conditioning_images[:, :1] + 1) * 127.5) / 255
    torch.testing.assert_close(batch.masks, expected, rtol=0, atol=0)


def test_optional_conditioning_in_repeat_folders(tmp_path):
    images, pairs = pair_folders(tmp_path)
    (tmp_path / "train").mkdir()
    images.rename(tmp_path / "train" / "2_thing")
    pairs.rename(tmp_path / "cond_root")
    ds = build_train_dataset(options(train_data_dir=str(tmp_path / "train"), conditioning_data_dir=str(tmp_path / "cond_root")),
                             conditioning=OPTIONAL)
    assert all(e.repeats == 2 and e.conditioning_path is not None for e in ds.images)
    plain = build_train_dataset(options(train_data_dir=str(tmp_path / "train"), conditioning_data_dir=str(tmp_path / "cond_root")))
    assert all(e.conditioning_path is None for e in plain.images)  # LoRA without --masked_loss ignores it


@pytest.mark.parametrize("to_disk", [False, True])
def test_cached_latents_come_with_their_conditioning_images(tmp_path, to_disk):
    from lorakit.families.registry import get_family

    images, pairs = pair_folders(tmp_path)
    ds = build_train_dataset(options(train_data_dir=str(images), conditioning_data_dir=str(pairs)), seed=1,
                             conditioning=REQUIRED)
    encode = lambda pixels: F.avg_pool2d(pixels, 8)  # noqa: E731  (a "VAE" whose latents are easy to predict)
    disk = {"to_disk": True, "latent_format": get_family("sd").latent_format} if to_disk else {}
    cache_dataset_latents(ds, encode, batch_size=2, **disk)
    for epoch in (1, 2):
        ds.set_epoch(epoch)
        for batch in (ds[i] for i in range(len(ds))):
            assert batch.images is None and batch.conditioning_images is not None
            torch.testing.assert_close(batch.latents.float(), encode(batch.conditioning_images), rtol=0, atol=1e-3)
