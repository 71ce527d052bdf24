"""--dataset_config: value lookup order, several datasets, and the errors for bad keys."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from lorakit.data.build import build_train_dataset
from lorakit.data.dataset_config import plan_datasets
from lorakit.data.metadata import dataset_metadata
from lorakit.errors import DataError


def make_images(folder: Path, count: int, size=(64, 64)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", size, (10 * i, 50, 90)).save(folder / f"{i}.png")
    return folder


def cli(**overrides) -> SimpleNamespace:
    values = dict(train_data_dir=None, reg_data_dir=None, resolution=None, train_batch_size=1,
                  enable_bucket=False, caption_extension=".caption", flip_aug=False, keep_tokens=0,
                  dataset_repeats=1, seed=0, prior_loss_weight=1.0)
    values.update(overrides)
    return SimpleNamespace(**values)


def write(tmp_path: Path, text: str, name="dataset.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_lookup_order_subset_dataset_general_cli_default(tmp_path):
    a, b = make_images(tmp_path / "a", 1), make_images(tmp_path / "b", 1)
    config = write(tmp_path, f"""
[general]
keep_tokens = 2
caption_extension = ".txt"
flip_aug = true

[[datasets]]
resolution = [96, 64]
batch_size = 4
keep_tokens = 3

  [[datasets.subsets]]
  image_dir = '{a}'
  num_repeats = 5
  keep_tokens = 1
  flip_aug = false

  [[datasets.subsets]]
  image_dir = '{b}'
  class_tokens = "sks dog"
""")
    plan = plan_datasets(cli(dataset_config=str(config), caption_extension=".cap", shuffle_caption=True))
    (dataset,) = plan.datasets
    first, second = dataset.subsets
    assert dataset.resolution == (96, 64) and dataset.batch_size == 4
    assert (first.keep_tokens, second.keep_tokens) == (1, 3)          # subset, then dataset
    assert (first.flip_aug, second.flip_aug) == (False, True)         # subset, then general
    assert first.caption_extension == ".txt"                          # general beats the command line
    assert first.shuffle_caption is True                              # command line beats the default
    assert (first.num_repeats, second.num_repeats) == (5, 1)          # --dataset_repeats default
    assert second.class_tokens == "sks dog" and first.class_tokens is None
    assert dataset.bucket_reso_steps == 64 and dataset.min_bucket_reso == 256   # built-in defaults


def test_cli_resolution_and_batch_size_fill_in(tmp_path):
    a = make_images(tmp_path / "a", 1)
    config = write(tmp_path, f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{a}'\n")
    (dataset,) = plan_datasets(cli(dataset_config=str(config), resolution=(64, 48), train_batch_size=3)).datasets
    assert dataset.resolution == (64, 48) and dataset.batch_size == 3


def test_missing_resolution_is_an_error(tmp_path):
    a = make_images(tmp_path / "a", 1)
    config = write(tmp_path, f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{a}'\n")
    with pytest.raises(DataError, match="resolution"):
        plan_datasets(cli(dataset_config=str(config)))


def test_all_key_problems_reported_at_once(tmp_path):
    config = write(tmp_path, """
[general]
image_dir = "x"
shufle_caption = true

[[datasets]]
resolution = 512
num_repaets = 3
validation_split = 2

  [[datasets.subsets]]
  image_dir = "y"
  batch_size = 2
  flip_aug = "yes"
  is_reg = true
  metadata_file = "meta.json"

  [[datasets.subsets]]
  num_repeats = 1
""")
    with pytest.raises(DataError) as info:
        plan_datasets(cli(dataset_config=str(config)))
    text = str(info.value)
    assert str(config) in text and "9 problem(s)" in text
    assert "[general]: image_dir is not allowed here; it belongs in [[datasets.subsets]]" in text
    assert "unknown key shufle_caption (did you mean shuffle_caption?)" in text
    assert "unknown key num_repaets (did you mean num_repeats?)" in text
    assert "validation_split = 2 must be a number from 0 up to (not including) 1" in text
    assert "batch_size is not allowed here; it belongs in [general] or [[datasets]]" in text
    assert "flip_aug = 'yes' must be a bool" in text
    assert "is_reg is not allowed in a fine-tuning (metadata_file) subset" in text
    assert "mixes subset kinds" in text
    assert "subset #2: image_dir is required" in text


def test_json_config_and_several_datasets(tmp_path):
    a, b = make_images(tmp_path / "a", 2), make_images(tmp_path / "b", 3, size=(32, 32))
    config = tmp_path / "dataset.json"
    config.write_text(json.dumps({
        "general": {"enable_bucket": False},
        "datasets": [
            {"resolution": 64, "batch_size": 2, "subsets": [{"image_dir": str(a), "num_repeats": 2}]},
            {"resolution": [32, 32], "batch_size": 1, "subsets": [{"image_dir": str(b)}]},
        ],
    }))
    cfg = cli(dataset_config=str(config), train_data_dir=str(tmp_path))
    ds = build_train_dataset(cfg, seed=0)
    summary = ds.summary()
    assert summary.num_train_images == 4 + 3 and len(ds) == 2 + 3
    shapes = {tuple(ds[i].images.shape) for i in range(len(ds))}
    assert shapes == {(2, 3, 64, 64), (1, 3, 32, 32)}
    meta = dataset_metadata(summary, cfg)
    datasets = json.loads(meta["ss_datasets"])
    assert [d["resolution"] for d in datasets] == [[64, 64], [32, 32]]
    assert [d["batch_size_per_device"] for d in datasets] == [2, 1]
    assert datasets[0]["subsets"][0]["image_dir"] == "a" and datasets[0]["subsets"][0]["img_count"] == 2
    assert json.loads(meta["ss_dataset_dirs"]) == {"a": {"n_repeats": 2, "img_count": 2},
                                                   "b": {"n_repeats": 1, "img_count": 3}}
    assert "ss_resolution" not in meta


def test_dataset_config_ignores_train_data_dir_with_warning(tmp_path, caplog):
    a = make_images(tmp_path / "a", 1)
    config = write(tmp_path, f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{a}'\n")
    with caplog.at_level(logging.WARNING):
        plan = plan_datasets(cli(dataset_config=str(config), train_data_dir="/nonexistent"))
    assert "--train_data_dir" in caplog.text and plan.from_config_file


def test_unparsable_and_missing_config(tmp_path):
    with pytest.raises(DataError, match="nope.toml"):
        plan_datasets(cli(dataset_config=str(tmp_path / "nope.toml")))
    bad = write(tmp_path, "[general\n", name="bad.toml")
    with pytest.raises(DataError, match="bad.toml.*cannot be parsed"):
        plan_datasets(cli(dataset_config=str(bad)))


def test_missing_image_dir_named(tmp_path):
    config = write(tmp_path, f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'gone'}'\n")
    with pytest.raises(DataError, match="gone"):
        build_train_dataset(cli(dataset_config=str(config)), seed=0)
