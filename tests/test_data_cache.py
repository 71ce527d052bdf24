"""Latent caching with a tiny real AutoencoderKL, and loading through a worker process."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from lorakit.data.dataset import build_train_dataset


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=64)
    return vae.eval()


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "train" / "2_cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "square.png")
    Image.linear_gradient("L").rotate(90).resize((128, 32)).convert("RGB").save(folder / "wide.png")
    Image.new("RGB", (72, 72), (0, 0, 255)).save(folder / "big.png")
    cfg = SimpleNamespace(train_data_dir=str(tmp_path / "train"), resolution=(64, 64), train_batch_size=2,
                          enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32,
                          caption_extension=".txt", flip_aug=True, prior_loss_weight=1.0)
    return build_train_dataset(cfg, seed=5)


def test_cache_latents_shapes_and_batches(dataset, tiny_vae):
    calls = []

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(pixels.shape))
        assert pixels.min() >= -1 and pixels.max() <= 1
        return tiny_vae.encode(pixels).latent_dist.mode() * 0.18215

    dataset.cache_latents(encode, batch_size=4, progress=False)
    # 3 images x (plain, flipped); buckets 64x64 (square, big) and 128x32 (wide) never share a call.
    assert sum(shape[0] for shape in calls) == 6
    assert sorted(calls) == [(1, 3, 32, 128), (1, 3, 32, 128), (2, 3, 64, 64), (2, 3, 64, 64)]
    assert len(dataset.latents) == 6
    for (image_id, _), latent in dataset.latents.items():
        w, h = dataset.images[image_id].choice.bucket
        assert latent.shape == (4, h // 8, w // 8)
    for i in range(len(dataset)):
        batch = dataset[i]
        assert batch.images is None and batch.latents is not None
        h, w = batch.target_sizes[0]
        assert batch.latents.shape == (len(batch), 4, h // 8, w // 8)
    wide = next(i for i, e in enumerate(dataset.images) if e.path.name == "wide.png")
    assert not torch.equal(dataset.latents[(wide, False)], dataset.latents[(wide, True)])


def test_flipped_latent_is_encoding_of_flipped_image(dataset, tiny_vae):
    encode = lambda x: tiny_vae.encode(x).latent_dist.mode()  # noqa: E731
    dataset.cache_latents(encode, batch_size=1)
    wide = next(i for i, e in enumerate(dataset.images) if e.path.name == "wide.png")
    pixels = dataset._centre_pixels(wide, (128, 32), flip=False)
    with torch.no_grad():
        direct = encode(pixels.flip(-1)[None])[0]
    torch.testing.assert_close(dataset.latents[(wide, True)], direct)


def test_loader_with_worker_process(dataset):
    dataset.set_epoch(2)
    expected = [plan.image_ids for plan in dataset.batch_plans()]
    loader = dataset.make_loader(num_workers=1, persistent=True)
    batches = list(loader)
    assert len(batches) == len(expected)
    dataset.set_epoch(3)
    second = list(loader)  # persistent worker still follows the new epoch's plans
    assert [len(b) for b in second] == [len(p.image_ids) for p in dataset.batch_plans()]
    assert all(b.images.shape[0] == len(b) for b in batches + second)
