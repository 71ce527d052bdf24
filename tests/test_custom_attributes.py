"""The dataset key `custom_attributes`: `diff_output_preservation = true` trains a subset's images towards the
base model's own prediction (sd-scripts' differential output preservation)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import resume_args, write_resume_world
from lorakit.config import parse_train_args
from lorakit.data.build import build_train_dataset
from lorakit.errors import DataError
from lorakit.training.run import train


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return write_resume_world(tmp_path_factory.mktemp("attributes"))


def config(world, tmp_path: Path, subset_extra: str, general_extra: str = "") -> list[str]:
    folder = next(world["data"].iterdir())
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "data.toml"
    path.write_text(f"[general]\nresolution = 64\n{general_extra}\n[[datasets]]\n[[datasets.subsets]]\n"
                    f'image_dir = "{folder}"\nnum_repeats = 2\n{subset_extra}\n', encoding="utf-8")
    argv = [a for a in resume_args(world, tmp_path / "out", "--network_dropout=0", "--max_train_steps=2")
            if not a.startswith("--train_data_dir")]
    return argv + [f"--dataset_config={path}"]


def test_attributes_reach_every_batch(world, tmp_path):
    cfg, _ = parse_train_args(config(world, tmp_path, "", 'custom_attributes = { diff_output_preservation = true, x = 1 }'))
    dataset = build_train_dataset(cfg, 3)
    batch = dataset[dataset.batch_plans()[0]]
    assert batch.custom_attributes == [{"diff_output_preservation": True, "x": 1}] * len(batch)
    cfg, _ = parse_train_args(config(world, tmp_path, 'custom_attributes = "yes"'))
    with pytest.raises(DataError, match="custom_attributes = 'yes' must be a table"):
        build_train_dataset(cfg, 3)


def test_preserved_images_learn_the_base_models_prediction(world, tmp_path):
    # the network starts as the base model (zero up factors), so the preserved target is the prediction itself:
    # the loss is exactly 0, no gradient flows and the up factors stay 0
    preserved = train(parse_train_args(config(world, tmp_path / "a", "custom_attributes.diff_output_preservation = true"))[0])
    assert preserved.step_losses == [0.0, 0.0]
    ups = {k: v for k, v in load_file(tmp_path / "a" / "out" / "tiny.safetensors").items() if "lora_up" in k}
    assert ups and all(not v.any() for v in ups.values())
    plain = train(parse_train_args(config(world, tmp_path / "b", "custom_attributes.other = true"))[0])
    assert all(loss > 0 for loss in plain.step_losses)
