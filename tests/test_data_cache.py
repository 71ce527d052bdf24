"""Latent caching with a tiny real AutoencoderKL, and loading through a worker process."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from lorakit.data.build import build_train_dataset
from lorakit.data.cache import cache_dataset_latents


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

    cache_dataset_latents(dataset, encode, batch_size=4, progress=False)
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
    cache_dataset_latents(dataset, encode, batch_size=1)
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


# ----- disk cache (sd-scripts file names and keys) -----

import numpy as np  # noqa: E402

from lorakit.data.cache import run_cache  # noqa: E402
from lorakit.families.registry import get_family  # noqa: E402

SD_FORMAT = get_family("sd").latent_format
from lorakit.errors import DataError  # noqa: E402


def disk_cfg(root, **overrides):
    values = dict(train_data_dir=str(root), resolution=(64, 64), train_batch_size=1, enable_bucket=True,
                  min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32, caption_extension=".txt",
                  flip_aug=False, vae_batch_size=2, seed=0)
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture
def disk_data(tmp_path):
    folder = tmp_path / "train" / "1_x"
    folder.mkdir(parents=True)
    for i, size in enumerate([(64, 64), (128, 32), (64, 64)]):
        Image.new("RGB", size, (40 * i, 90, 200)).save(folder / f"img{i}.png")
    return tmp_path / "train", folder


def scaled_encoder(vae, calls):
    def encode(pixels):
        calls.append(pixels.shape[0])
        return vae.encode(pixels).latent_dist.mode() * 0.18215
    return encode


def test_disk_cache_names_keys_and_unscaled_values(disk_data, tiny_vae):
    root, folder = disk_data
    calls = []
    report = run_cache(disk_cfg(root), scaled_encoder(tiny_vae, calls), latent_format=SD_FORMAT, vae_id="vae-a",
                       progress=False)
    assert report.encoded == 3 and report.reused == 0
    path = folder / "img1_0128x0032_sd.npz"
    with np.load(path) as data:
        assert {"latents", "original_size", "crop_ltrb"} <= set(data.files)
        assert data["latents"].shape == (4, 4, 16) and data["original_size"].tolist() == [128, 32]
        assert data["crop_ltrb"].tolist() == [0, 0, 128, 32]
        pixels = torch.from_numpy(np.asarray(Image.open(folder / "img1.png"), dtype=np.float32))
        pixels = (pixels / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            raw = tiny_vae.encode(pixels).latent_dist.mode()[0]
        np.testing.assert_allclose(data["latents"], raw.numpy(), atol=1e-5)  # stored unscaled, as sd-scripts
    assert sorted(p.name for p in folder.glob("*.npz")) == ["img0_0064x0064_sd.npz", "img1_0128x0032_sd.npz",
                                                          "img2_0064x0064_sd.npz"]
    assert not list(folder.glob("*.tmp"))


def test_disk_cache_resumes_after_interruption(disk_data, tiny_vae):
    root, folder = disk_data
    calls = []
    encode = scaled_encoder(tiny_vae, calls)

    def failing(pixels):
        if len(calls) >= 1:
            raise KeyboardInterrupt
        return encode(pixels)

    with pytest.raises(KeyboardInterrupt):
        run_cache(disk_cfg(root, vae_batch_size=1), failing, SD_FORMAT, progress=False)
    assert len(list(folder.glob("*.npz"))) == 1 and not list(folder.glob("*.tmp"))
    report = run_cache(disk_cfg(root), encode, SD_FORMAT, progress=False)
    assert (report.encoded, report.reused) == (2, 1)
    assert run_cache(disk_cfg(root), encode, SD_FORMAT, progress=False).encoded == 0


def test_disk_cache_invalidated_by_image_vae_flip_and_resolution(disk_data, tiny_vae):
    root, folder = disk_data
    encode = scaled_encoder(tiny_vae, [])
    run_cache(disk_cfg(root), encode, SD_FORMAT, vae_id="a", progress=False)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "img0.png")  # same size, new content
    assert run_cache(disk_cfg(root), encode, SD_FORMAT, vae_id="a", progress=False).encoded == 1
    assert run_cache(disk_cfg(root), encode, SD_FORMAT, vae_id="b", progress=False).encoded == 3
    assert run_cache(disk_cfg(root, flip_aug=True), encode, SD_FORMAT, vae_id="b", progress=False).encoded == 3
    with np.load(folder / "img1_0128x0032_sd.npz") as data:
        assert "latents_flipped" in data.files
    assert run_cache(disk_cfg(root, resolution=(32, 32), min_bucket_reso=32), encode, SD_FORMAT, vae_id="b",
                     progress=False).encoded == 3


def test_batches_from_disk_match_memory(disk_data, tiny_vae):
    root, _ = disk_data
    encode = scaled_encoder(tiny_vae, [])
    ram = build_train_dataset(disk_cfg(root, flip_aug=True), seed=1)
    cache_dataset_latents(ram, encode, 2)
    disk = build_train_dataset(disk_cfg(root, flip_aug=True), seed=1)
    cache_dataset_latents(disk, encode, 2, to_disk=True, latent_format=SD_FORMAT)
    for i in range(len(ram)):
        torch.testing.assert_close(ram[i].latents, disk[i].latents, atol=1e-5, rtol=1e-5)


def test_multi_resolution_keys_for_flux(disk_data, tiny_vae):
    root, folder = disk_data
    run_cache(disk_cfg(root), scaled_encoder(tiny_vae, []), latent_format=get_family("flux").latent_format, progress=False)
    with np.load(folder / "img1_0128x0032_flux.npz") as data:
        assert {"latents_4x16", "original_size_4x16", "crop_ltrb_4x16"} <= set(data.files)


def test_cache_refuses_color_aug(disk_data, tiny_vae):
    root, _ = disk_data
    with pytest.raises(DataError, match="color_aug"):
        run_cache(disk_cfg(root, color_aug=True), scaled_encoder(tiny_vae, []), SD_FORMAT, progress=False)
