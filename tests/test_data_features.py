"""Fine-tuning metadata, masks, augmentations, cache_info, resume order and the dataset metadata keys."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.data.augment import apply_gamma, color_augment, face_crop_placement, shift_hue
from lorakit.data.build import build_train_dataset
from lorakit.data.images import Placement, apply_placement
from lorakit.data.info_cache import INFO_CACHE_NAME
from lorakit.data.masks import mask_to_latent
from lorakit.data.metadata import dataset_metadata
from lorakit.data.resume import resume_point
from lorakit.errors import DataError


def cfg(**overrides) -> SimpleNamespace:
    values = dict(train_data_dir=None, reg_data_dir=None, dataset_config=None, in_json=None, resolution=(64, 64),
                  train_batch_size=1, enable_bucket=False, caption_extension=".txt", seed=0, masked_loss=False,
                  prior_loss_weight=1.0, dataset_repeats=1, caption_separator=",")
    values.update(overrides)
    return SimpleNamespace(**values)


def image(path: Path, size=(64, 64), color=(200, 100, 50), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


# ----- fine-tuning metadata -----

def test_in_json_caption_plus_tags_and_relative_keys(tmp_path):
    image(tmp_path / "imgs" / "a.png")
    image(tmp_path / "imgs" / "b.jpg", (96, 64))
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"caption": "a cat", "tags": "cute, small"},
                                "b.jpg": {"tags": "dog", "image_size": [96, 64]}}))
    config = cfg(in_json=str(meta), train_data_dir=str(tmp_path / "imgs"), dataset_repeats=3)
    ds = build_train_dataset(config)
    assert {e.path.name: e.caption for e in ds.images} == {"a.png": "a cat,cute, small", "b.jpg": "dog"}
    summary = ds.summary()
    assert summary.num_train_images == 6
    entry = json.loads(dataset_metadata(summary, config)["ss_dataset_dirs"])
    assert entry == {"meta.json": {"n_repeats": 3, "img_count": 2}}


def test_metadata_file_in_config_and_missing_image_named(tmp_path):
    meta = tmp_path / "meta.jsonl"
    meta.write_text(json.dumps({"image_path": str(tmp_path / "gone.png"), "caption": "x"}) + "\n")
    config = tmp_path / "d.toml"
    config.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nmetadata_file = '{meta}'\n")
    with pytest.raises(DataError, match="gone.png"):
        build_train_dataset(cfg(dataset_config=str(config)))


def test_fine_tuning_ss_datasets_entry(tmp_path):
    image(tmp_path / "a.png")
    meta = tmp_path / "m.json"
    meta.write_text(json.dumps({str(tmp_path / "a.png"): {"caption": "x"}}))
    config = tmp_path / "d.toml"
    config.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nmetadata_file = '{meta}'\n")
    run = cfg(dataset_config=str(config))
    (entry,) = json.loads(dataset_metadata(build_train_dataset(run).summary(), run)["ss_datasets"])
    assert entry["is_dreambooth"] is False and entry["subsets"][0]["metadata_file"] == "m.json"
    assert "image_dir" not in entry["subsets"][0]


# ----- masks -----

def masked_folders(tmp_path: Path, mask_size=(64, 64)) -> SimpleNamespace:
    image(tmp_path / "train" / "1_x" / "a.png", (64, 64))
    red = Image.new("RGB", mask_size, (0, 0, 0))
    red.paste((255, 0, 0), (0, 0, mask_size[0] // 2, mask_size[1]))  # left half weight 1, right half 0
    (tmp_path / "masks").mkdir()
    red.save(tmp_path / "masks" / "a.png")
    return cfg(train_data_dir=str(tmp_path / "train"), masked_loss=True, conditioning_data_dir=str(tmp_path / "masks"))


def test_conditioning_mask_red_channel_and_flip(tmp_path):
    ds = build_train_dataset(masked_folders(tmp_path))
    batch = ds[0]
    assert batch.masks.shape == (1, 1, 64, 64)
    assert batch.masks[0, 0, :, :32].eq(1).all() and batch.masks[0, 0, :, 32:].eq(0).all()
    latent_mask = mask_to_latent(batch.masks, (8, 8))
    assert latent_mask.shape == (1, 1, 8, 8) and latent_mask[0, 0, 0].tolist() == [1] * 4 + [0] * 4


def test_mask_of_wrong_size_and_missing_mask_named(tmp_path):
    with pytest.raises(DataError, match=r"conditioning image .*a.png is 32x32 but its image .*a.png is 64x64"):
        build_train_dataset(masked_folders(tmp_path, mask_size=(32, 32)))


def test_conditioning_in_config_needs_masked_loss(tmp_path):
    config = tmp_path / "d.toml"
    config.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'a'\n"
                      "conditioning_data_dir = 'b'\nrandom_crop = true\n")
    with pytest.raises(DataError) as info:
        build_train_dataset(cfg(dataset_config=str(config)))
    assert "needs --masked_loss" in str(info.value) and "random_crop cannot be used" in str(info.value)


def test_alpha_mask_from_png_alpha(tmp_path):
    path = image(tmp_path / "t" / "1_x" / "a.png", color=(10, 20, 30, 51), mode="RGBA")
    image(path.parent / "b.png")  # no alpha: a mask of ones
    ds = build_train_dataset(cfg(train_data_dir=str(tmp_path / "t"), alpha_mask=True, train_batch_size=2))
    batch = ds[0]
    names = [ds.images[i].path.name for i in ds.batch_plans()[0].image_ids]
    masks = dict(zip(names, batch.masks[:, 0]))
    assert torch.allclose(masks["a.png"], torch.full((64, 64), 0.2)) and masks["b.png"].eq(1).all()


def test_mask_to_latent_area_average():
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1.0
    assert mask_to_latent(mask, (2, 2)).tolist() == [[[[1.0, 0.0], [0.0, 0.0]]]]
    assert mask_to_latent(torch.ones(2, 1, 8, 8), (1, 1)).shape == (2, 1, 1, 1)


# ----- augmentations -----

def test_hue_shift_and_gamma_by_hand():
    red = Image.new("RGB", (2, 2), (255, 0, 0))
    assert shift_hue(red, 120).getpixel((0, 0)) == (0, 255, 0)  # 120 degrees: red -> green
    grey = Image.new("RGB", (1, 1), (64, 64, 64))
    assert apply_gamma(grey, 2.0).getpixel((0, 0)) == (16, 16, 16)  # 255 * (64/255)^2 = 15.8


def test_color_aug_is_seeded_and_sometimes_identity():
    img = Image.new("RGB", (4, 4), (180, 60, 30))
    results = [np.asarray(color_augment(img, random.Random(s))) for s in range(30)]
    unchanged = sum(np.array_equal(r, np.asarray(img)) for r in results)
    assert 10 < unchanged < 30  # about 2/3 untouched
    assert np.array_equal(results[3], np.asarray(color_augment(img, random.Random(3))))


def test_face_crop_centres_the_face():
    # 400x300 image, face 40x40 at (300, 100), target 64x64, face scale range 1..1: scale
    # = max(cover 0.2133, 64 / (40 * 1)) = 1.0 capped at 1 -> no resize; crop starts at face - 32.
    placement = face_crop_placement((400, 300), (300, 100, 40, 40), (64, 64), (1.0, 1.0), False, random.Random(0))
    assert placement == Placement((400, 300), (268, 68, 332, 132), False)
    # range 4..4: scale = 64 / (40 * 4) = 0.4 -> 160x120, face at (120, 40): crop from (88, 8).
    placement = face_crop_placement((400, 300), (300, 100, 40, 40), (64, 64), (4.0, 4.0), False, random.Random(0))
    assert placement == Placement((160, 120), (88, 8, 152, 72), False)


def test_face_crop_used_without_buckets(tmp_path):
    path = image(tmp_path / "t" / "1_x" / "pic_300_100_40_40.png", (400, 300))
    img = Image.open(path).convert("RGB")
    img.paste((0, 255, 0), (268, 68, 332, 132))
    img.save(path)
    ds = build_train_dataset(cfg(train_data_dir=str(tmp_path / "t"), face_crop_aug_range=(1.0, 1.0)))
    assert ds[0].images[0, 1].eq(1).all()  # the crop is exactly the green face box


def test_apply_placement_crops_then_flips():
    img = Image.new("L", (4, 1))
    img.putdata([0, 1, 2, 3])
    out = apply_placement(img, Placement((4, 1), (1, 0, 4, 1), True))
    assert list(out.getdata()) == [3, 2, 1]


# ----- cache_info, resume order -----

def test_cache_info_written_and_reused(tmp_path):
    folder = tmp_path / "t" / "2_x"
    image(folder / "a.png", (96, 64))
    (folder / "a.txt").write_text("tag", encoding="utf-8")
    build_train_dataset(cfg(train_data_dir=str(tmp_path / "t"), cache_info=True))
    stored = json.loads((folder / INFO_CACHE_NAME).read_text())
    assert stored == {str(folder / "a.png"): {"caption": "tag", "resolution": [96, 64]}}
    (folder / "a.txt").write_text("changed", encoding="utf-8")  # the cache is trusted, as in sd-scripts
    assert build_train_dataset(cfg(train_data_dir=str(tmp_path / "t"), cache_info=True)).images[0].caption == "tag"


def test_skip_batches_resumes_same_batches(tmp_path):
    for i in range(6):
        image(tmp_path / "t" / "2_x" / f"{i}.png", color=(i * 40, 0, 0))
        (tmp_path / "t" / "2_x" / f"{i}.txt").write_text(f"a{i}, b, c, d", encoding="utf-8")
    run = cfg(train_data_dir=str(tmp_path / "t"), train_batch_size=2, shuffle_caption=True, flip_aug=True)
    full = build_train_dataset(run, seed=4)
    full.set_epoch(2)
    expected = list(full.make_loader())
    resumed = build_train_dataset(run, seed=4)
    resumed.set_epoch(2)
    resumed.skip_batches(4)
    got = list(resumed.make_loader())
    assert len(got) == 2 and [b.captions for b in got] == [b.captions for b in expected[4:]]
    assert all(torch.equal(x.images, y.images) for x, y in zip(got, expected[4:]))
    assert len(list(resumed.make_loader())) == 2  # reading the batches does not use the skip up (workers read twice)
    resumed.set_epoch(3)
    assert len(list(resumed.make_loader())) == 6  # the next epoch starts at its first batch


@pytest.mark.parametrize("step, batches, accum, expected", [
    (0, 10, 1, (1, 0, 0)), (25, 10, 1, (3, 5, 25)), (7, 10, 2, (2, 4, 7)), (5, 10, 2, (2, 0, 5)),
])
def test_resume_point(step, batches, accum, expected):
    # 10 batches with accumulation 2 = 5 steps per epoch; step 7 = epoch 2 after 2 steps = 4 batches.
    point = resume_point(step, batches, accum)
    assert (point.epoch, point.skip_batches, point.global_step) == expected


def test_missing_caption_warning_counts_and_training_continues(tmp_path, caplog):
    image(tmp_path / "t" / "1_x" / "a.png")
    image(tmp_path / "t" / "1_x" / "b.png")
    with caplog.at_level(logging.WARNING):
        ds = build_train_dataset(cfg(train_data_dir=str(tmp_path / "t")))
    assert len(ds) == 2 and "2 image(s) have no .txt caption file" in caplog.text
