"""Discovery, captions, regularisation balancing, batching, epoch shuffling and error cases."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.data.build import balance_regularisation, build_train_dataset
from lorakit.data.discovery import parse_repeat_folder_name, scan_repeat_folders
from lorakit.data.metadata import dataset_metadata
from lorakit.data.summary import format_summary
from lorakit.errors import DataError


def make_image(path: Path, size: tuple[int, int], color=(200, 30, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def make_cfg(**overrides) -> SimpleNamespace:
    values = dict(train_data_dir=None, reg_data_dir=None, dataset_config=None, resolution=(64, 64),
                  train_batch_size=2, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                  bucket_reso_steps=32, bucket_no_upscale=False, caption_extension=".txt",
                  prior_loss_weight=0.5, max_data_loader_n_workers=0, persistent_data_loader_workers=False,
                  seed=7, flip_aug=False, random_crop=False, shuffle_caption=False, keep_tokens=0,
                  caption_separator=",")
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture
def folders(tmp_path):
    """train/10_sks girl: a 64x64 (no caption) and a 128x32 (captioned); reg/1_girl: three 64x64 images."""
    train = tmp_path / "train"
    make_image(train / "10_sks girl" / "a.png", (64, 64))
    make_image(train / "10_sks girl" / "b.PNG", (128, 32))
    (train / "10_sks girl" / "b.txt").write_text("Tag1, tag2\nsecond line ignored\n", encoding="utf-8")
    make_image(train / "notes" / "x.png", (64, 64))
    (train / "10_sks girl" / "readme.md").write_text("not an image")
    reg = tmp_path / "reg"
    for name in ("r1.png", "r2.jpg", "r3.webp"):
        make_image(reg / "1_girl" / name, (64, 64))
    return train, reg


def test_parse_folder_names():
    assert parse_repeat_folder_name("10_sks girl") == (10, "sks girl")
    assert parse_repeat_folder_name("3_a_b") == (3, "a_b")
    assert parse_repeat_folder_name("5") == (5, "")
    assert parse_repeat_folder_name("notes") is None


def test_scan_skips_unprefixed_folders(folders, caplog):
    train, _ = folders
    with caplog.at_level(logging.WARNING):
        found = scan_repeat_folders(train, is_reg=False)
    assert [(f.path.name, f.num_repeats, f.class_tokens) for f in found] == [("10_sks girl", 10, "sks girl")]
    assert "notes" in caplog.text


def test_zero_and_negative_repeat_folders_are_errors_naming_them_all(folders):
    train, reg = folders
    make_image(train / "0_never" / "y.png", (64, 64))
    make_image(reg / "-1_girl" / "y.png", (64, 64))
    with pytest.raises(DataError, match="0_never") as error:
        scan_repeat_folders(train, is_reg=False)
    assert "must be 1 or more" in str(error.value)
    with pytest.raises(DataError, match="-1_girl"):
        scan_repeat_folders(reg, is_reg=True)


def test_discovery_captions_and_missing_caption_warning(folders, caplog):
    train, _ = folders
    with caplog.at_level(logging.WARNING):
        ds = build_train_dataset(make_cfg(train_data_dir=str(train)), seed=1)
    captions = {e.path.name: e.caption for e in ds.images}
    assert captions == {"a.png": "sks girl", "b.PNG": "Tag1, tag2"}
    warnings = [r.message for r in caplog.records if "caption file" in r.getMessage()]
    assert len(warnings) == 1 and "1 image(s)" in caplog.text


def test_face_crop_suffix_caption_fallback(tmp_path):
    folder = tmp_path / "train" / "2_x"
    make_image(folder / "photo_10_20_30_40.png", (64, 64))
    (folder / "photo.txt").write_text("from the uncropped name", encoding="utf-8")
    ds = build_train_dataset(make_cfg(train_data_dir=str(tmp_path / "train")), seed=0)
    assert ds.images[0].caption == "from the uncropped name"


def test_balance_regularisation_rule():
    assert balance_regularisation(20, [1, 1, 1]) == [7, 7, 6]
    assert balance_regularisation(7, [5, 5, 5]) == [5, 5, 0]
    assert balance_regularisation(0, [1, 1]) == [0, 0]


def test_reg_images_balanced_and_weighted(folders):
    train, reg = folders
    ds = build_train_dataset(make_cfg(train_data_dir=str(train), reg_data_dir=str(reg)), seed=1)
    summary = ds.summary()
    assert summary.num_train_images == 20 and summary.num_reg_images == 3
    reg_samples = sum(e.repeats for e in ds.images if ds.subsets[e.subset_index].is_reg)
    assert reg_samples == 20
    # 64x64 bucket: a x10 + 20 reg = 30 -> 15 batches; 128x32 bucket: b x10 -> 5 batches.
    assert {(b.resolution, b.count) for b in summary.buckets} == {((64, 64), 30), ((128, 32), 10)}
    assert len(ds) == summary.batches_per_epoch == 20
    batch = ds[0]
    assert batch.images.shape[0] == len(batch) and batch.images.min() >= -1 and batch.images.max() <= 1
    plan_weights = {0.5 if ds.subsets[ds.images[i].subset_index].is_reg else 1.0
                    for p in ds.batch_plans() for i in p.image_ids}
    assert plan_weights == {0.5, 1.0}
    for i, plan in enumerate(ds.batch_plans()[:6]):
        b = ds[i]
        expected = [0.5 if ds.subsets[ds.images[j].subset_index].is_reg else 1.0 for j in plan.image_ids]
        assert b.loss_weights.tolist() == expected
    text = format_summary(summary)
    assert "10_sks girl" in text and "128x32" in text and "reg" in text


def test_batches_never_mix_buckets_and_match_sizes(folders):
    train, reg = folders
    ds = build_train_dataset(make_cfg(train_data_dir=str(train), reg_data_dir=str(reg)), seed=1)
    for index, plan in enumerate(ds.batch_plans()):
        assert {ds.images[i].choice.bucket for i in plan.image_ids} == {plan.bucket}
        assert 1 <= len(plan.image_ids) <= 2
    batch = next(b for i in range(len(ds)) if (b := ds[i]).target_sizes[0] == (32, 128))
    assert batch.images.shape[1:] == (3, 32, 128)
    assert batch.original_sizes[0] == (32, 128)


def test_epoch_shuffle_reproducible(folders):
    train, reg = folders
    cfg = make_cfg(train_data_dir=str(train), reg_data_dir=str(reg))
    first, second = build_train_dataset(cfg, seed=3), build_train_dataset(cfg, seed=3)
    orders = []
    for epoch in (1, 2):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        assert first.batch_plans() == second.batch_plans()
        orders.append([p.image_ids for p in first.batch_plans()])
    assert orders[0] != orders[1]
    first.set_epoch(1)
    assert [p.image_ids for p in first.batch_plans()] == orders[0]
    counts = sorted(i for p in first.batch_plans() for i in p.image_ids)
    assert len(counts) == 40  # every image appears exactly `repeats` times per epoch


def test_loader_yields_batches(folders):
    train, _ = folders
    ds = build_train_dataset(make_cfg(train_data_dir=str(train), flip_aug=True, shuffle_caption=True), seed=1)
    ds.set_epoch(1)
    batches = list(ds.make_loader(num_workers=0))
    assert len(batches) == len(ds) and all(b.images is not None for b in batches)
    assert sum(len(b) for b in batches) == 20
    again = list(ds.make_loader(num_workers=0))
    assert [b.captions for b in again] == [b.captions for b in batches]
    assert all(torch.equal(x.images, y.images) for x, y in zip(again, batches))


def test_metadata_without_config(folders):
    train, reg = folders
    cfg = make_cfg(train_data_dir=str(train), reg_data_dir=str(reg))
    meta = dataset_metadata(build_train_dataset(cfg, seed=1).summary(), cfg, num_processes=2,
                            gradient_accumulation_steps=3)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_total_batch_size"] == "12" and meta["ss_batch_size_per_device"] == "2"
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_enable_bucket"] == "True"
    assert meta["ss_num_train_images"] == "20" and meta["ss_num_reg_images"] == "3"
    assert meta["ss_dataset_dirs"] == '{"10_sks girl": {"n_repeats": 10, "img_count": 2}}'
    assert meta["ss_reg_dataset_dirs"] == '{"1_girl": {"n_repeats": 1, "img_count": 3}}'
    assert '"tag1": 1' in meta["ss_tag_frequency"] and '"sks girl": 1' in meta["ss_tag_frequency"]
    assert '"count": 30' in meta["ss_bucket_info"] and "mean_img_ar_error" in meta["ss_bucket_info"]


def test_no_bucket_mode_resizes_to_resolution(tmp_path):
    make_image(tmp_path / "t" / "1_a" / "wide.png", (96, 48))
    ds = build_train_dataset(make_cfg(train_data_dir=str(tmp_path / "t"), enable_bucket=False), seed=0)
    batch = ds[0]
    assert batch.images.shape == (1, 3, 64, 64) and batch.target_sizes == [(64, 64)]
    meta = dataset_metadata(ds.summary(), make_cfg(enable_bucket=False))
    assert meta["ss_bucket_info"] == "null" and meta["ss_min_bucket_reso"] == "None"


# ----- errors -----

def test_missing_and_empty_dirs(tmp_path):
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        build_train_dataset(make_cfg(train_data_dir=str(tmp_path / "nowhere")), seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*10_mychar"):
        build_train_dataset(make_cfg(train_data_dir=str(tmp_path / "empty")), seed=0)
    (tmp_path / "noprefix" / "pics").mkdir(parents=True)
    with pytest.raises(DataError, match="noprefix"):
        build_train_dataset(make_cfg(train_data_dir=str(tmp_path / "noprefix")), seed=0)
    (tmp_path / "noimages" / "3_x").mkdir(parents=True)
    with pytest.raises(DataError, match="no training images"):
        build_train_dataset(make_cfg(train_data_dir=str(tmp_path / "noimages")), seed=0)


def test_corrupt_image_named(tmp_path):
    folder = tmp_path / "t" / "1_a"
    make_image(folder / "good.png", (64, 64))
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        build_train_dataset(make_cfg(train_data_dir=str(tmp_path / "t")), seed=0)


def test_truncated_image_named_when_loaded(tmp_path):
    folder = tmp_path / "t" / "1_a"
    path = folder / "cut.png"
    folder.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(DataError, match="cut.png"):
        ds = build_train_dataset(make_cfg(train_data_dir=str(tmp_path / "t")), seed=0)
        ds[0]


@pytest.mark.parametrize("content, message", [(b"", "empty"), (b"caf\xe9 girl", "UTF-8")])
def test_bad_caption_files_named(tmp_path, content, message):
    folder = tmp_path / "t" / "1_a"
    make_image(folder / "img.png", (64, 64))
    (folder / "img.txt").write_bytes(content)
    with pytest.raises(DataError, match=f"img.txt.*{message}"):
        build_train_dataset(make_cfg(train_data_dir=str(tmp_path / "t")), seed=0)


def test_decompression_bomb_named(tmp_path, monkeypatch):
    make_image(tmp_path / "t" / "1_a" / "huge.png", (96, 96))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="huge.png.*too large"):
        build_train_dataset(make_cfg(train_data_dir=str(tmp_path / "t")), seed=0)


def test_tiny_image_with_no_upscale_named(tmp_path):
    make_image(tmp_path / "t" / "1_a" / "tiny.png", (20, 20))
    with pytest.raises(DataError, match="tiny.png"):
        build_train_dataset(make_cfg(train_data_dir=str(tmp_path / "t"), bucket_no_upscale=True), seed=0)
