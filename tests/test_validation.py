"""The validation loss (--validation_split and friends) and --lr_scheduler reduce_lr_on_plateau, as sd-scripts."""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import resume_args, write_resume_world
from lorakit.config import parse_train_args
from lorakit.data.build import build_train_dataset
from lorakit.data.holdout import TRAINING, VALIDATION, held_out_indices
from lorakit.errors import ConfigError
from lorakit.objectives.ddpm import DDPMObjective
from lorakit.objectives.flow import FlowObjective
from lorakit.training.run import train
from lorakit.training.validation import validation_timesteps
from test_reliability_resume import logged_scalars


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return write_resume_world(tmp_path_factory.mktemp("validation"))


def run(argv: list[str]):
    cfg, _ = parse_train_args(argv)
    return train(cfg)


def test_split_is_sd_scripts_split():
    for count, fraction, seed in [(10, 0.2, 42), (7, 0.3, 0), (4, 0.25, 3)]:
        order = list(range(count))
        random.seed(seed)  # sd-scripts seeds Python's global RNG and shuffles the (path, size) list
        random.shuffle(order)
        training, validation = held_out_indices(count, fraction, seed, TRAINING), held_out_indices(count, fraction, seed, VALIDATION)
        assert training == order[: math.ceil(count * (1 - fraction))]
        assert validation == order[count - round(count * fraction):]
        assert sorted(training + validation) == list(range(count))
    # sd-scripts' rounding can put an image on both sides: kept, as there
    assert set(held_out_indices(3, 0.5, 1, TRAINING)) & set(held_out_indices(3, 0.5, 1, VALIDATION))


def test_fixed_timesteps():
    cfg = SimpleNamespace(min_timestep=None, max_timestep=None)
    assert validation_timesteps(cfg) == [200, 400, 600, 800]
    assert validation_timesteps(SimpleNamespace(min_timestep=100, max_timestep=900)) == [260, 420, 580, 740]
    latents = torch.zeros(3, 4, 8, 8)
    ddpm = DDPMObjective.from_options(SimpleNamespace(), "epsilon").at_timestep(400)
    assert ddpm.noise(latents).timesteps.tolist() == [400, 400, 400]
    flow = FlowObjective().at_timestep(600).noise(latents)
    assert flow.timesteps.tolist() == pytest.approx([600.0] * 3)
    torch.testing.assert_close(flow.noisy, 0.6 * (flow.target + latents))  # x = (1 − σ)·0 + σ·ε, target ε − 0


def test_held_out_images_leave_training(world, tmp_path):
    cfg, _ = parse_train_args(resume_args(world, tmp_path, "--validation_split=0.25", "--validation_seed=5"))
    dataset = build_train_dataset(cfg, 3)
    held = {e.path for e in dataset.validation.images}
    assert len(held) == 1 and len(dataset.images) == 3 and not held & {e.path for e in dataset.images}
    assert all(e.repeats == 1 for e in dataset.validation.images)


def test_validation_logs_and_values(world, tmp_path):
    logs = tmp_path / "logs"
    extra = ["--validation_split=0.25", "--validation_seed=5", "--validate_every_n_steps=2", "--lr_scheduler=constant",
             "--network_dropout=0"]
    result = run(resume_args(world, tmp_path / "a", *extra, f"--logging_dir={logs}"))
    # 3 training images x 2 repeats at batch 2: 3 steps per epoch, 6 steps = 2 epochs
    assert [(v.kind, v.number) for v in result.validations] == [("step", 2), ("epoch", 1), ("step", 4), ("step", 6),
                                                                ("epoch", 2)]
    scalars = logged_scalars(logs)
    assert scalars["loss/validation/step_average"] == pytest.approx({v.number: v.average for v in result.validations
                                                                     if v.kind == "step"})
    assert scalars["loss/validation/epoch_average"] == pytest.approx({1: result.validations[1].average,
                                                                      2: result.validations[4].average})
    for step in (2, 4, 6):  # the divergence is the validation loss minus the training loss's moving average
        divergence = scalars["loss/validation/step_average"][step] - scalars["loss/average"][step]
        assert scalars["loss/validation/step_divergence"][step] == pytest.approx(divergence, abs=1e-6)
    assert set(scalars["loss/epoch_average"]) == {1, 2}
    # nothing but the weights changes a validation: the last step's and the last epoch's see the same weights
    assert result.validations[3].average == result.validations[4].average
    # validation leaves training alone: the same run without it trains the same steps
    plain = run(resume_args(world, tmp_path / "b", "--validation_split=0.25", "--validation_seed=5",
                            "--validate_every_n_epochs=99", "--lr_scheduler=constant", "--network_dropout=0"))
    assert plain.step_losses == result.step_losses


def test_reduce_lr_on_plateau_needs_validation_and_lowers_the_lr(world, tmp_path):
    with pytest.raises(ConfigError, match="reduce_lr_on_plateau lowers the LR when the validation loss"):
        run(resume_args(world, tmp_path / "x", "--lr_scheduler=reduce_lr_on_plateau"))
    # patience 0 and a huge threshold: every validation counts as no improvement, so each one halves the LR
    logs = tmp_path / "logs"
    result = run(resume_args(world, tmp_path / "y", "--validation_split=0.25", "--validate_every_n_steps=1",
                             "--lr_scheduler=reduce_lr_on_plateau", "--lr_scheduler_args", "patience=0", "factor=0.5",
                             "threshold=10", "--max_train_steps=3", "--validate_every_n_epochs=99",
                             f"--logging_dir={logs}"))
    assert len(result.validations) == 3
    lrs = next(values for tag, values in logged_scalars(logs).items() if tag.startswith("lr/"))
    assert lrs == pytest.approx({1: 1e-3, 2: 5e-4, 3: 2.5e-4})


def test_dataset_keys(world, tmp_path):
    config = tmp_path / "data.toml"
    config.write_text(f'[general]\nresolution = 64\n[[datasets]]\nvalidation_split = 0.5\nvalidation_seed = 1\n'
                      f'[[datasets.subsets]]\nimage_dir = "{next(world["data"].iterdir())}"\n', encoding="utf-8")
    argv = [a for a in resume_args(world, tmp_path) if not a.startswith("--train_data_dir")]
    cfg, _ = parse_train_args(argv + [f"--dataset_config={config}"])
    dataset = build_train_dataset(cfg, 3)
    assert len(dataset.images) == 2 and len(dataset.validation.images) == 2
    config.write_text(config.read_text(encoding="utf-8").replace("0.5", "1.5"), encoding="utf-8")
    with pytest.raises(Exception, match="validation_split = 1.5 must be a number from 0 up to"):
        build_train_dataset(cfg, 3)
