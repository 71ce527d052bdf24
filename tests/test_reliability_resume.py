"""A long run can be trusted: resume is exact with the default data loader (worker processes, persistent or
not), the logged losses continue exactly across a resume, and a NaN loss stops the run without spoiling files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import resume_args, write_resume_world
from lorakit.cli.main import main
from lorakit.config import parse_train_args
from lorakit.training.run import train


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return write_resume_world(tmp_path_factory.mktemp("reliable"))


def args(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return resume_args(world, out, "--flip_aug", "--shuffle_caption", *extra)


def run(argv: list[str]):
    cfg, _ = parse_train_args(argv)
    return train(cfg)


def logged_scalars(logging_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the TensorBoard event files of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, dict[int, float]] = {}
    for events in logging_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return values


@pytest.mark.parametrize("persistent", [False, True], ids=["workers", "persistent-workers"])
def test_resume_with_workers_is_exact_and_logs_the_same_losses(world, tmp_path, persistent):
    extra = ["--persistent_data_loader_workers"] if persistent else []
    full_out, resumed_out = tmp_path / "full", tmp_path / "resumed"
    full = run(args(world, full_out, "--save_every_n_steps=3", "--save_state", f"--logging_dir={tmp_path / 'full_logs'}", *extra))
    resumed = run(args(world, resumed_out, f"--resume={full_out / 'tiny-step00000003-state'}",
                       f"--logging_dir={tmp_path / 'resumed_logs'}", *extra))
    assert resumed.step_losses == full.step_losses[3:]
    a, b = load_file(full_out / "tiny.safetensors"), load_file(resumed_out / "tiny.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    full_logs, resumed_logs = logged_scalars(tmp_path / "full_logs"), logged_scalars(tmp_path / "resumed_logs")
    assert sorted(full_logs["loss/current"]) == [1, 2, 3, 4, 5, 6], "every step is logged at its own step"
    assert [full_logs["loss/current"][s] for s in (1, 2, 3)] == pytest.approx(full.step_losses[:3])
    for tag in ("loss/current", "loss/average"):
        assert resumed_logs[tag] == {s: full_logs[tag][s] for s in (4, 5, 6)}, tag
    # sd-scripts' moving average: the mean of the first epoch's steps so far, then a window of one epoch
    losses = [full_logs["loss/current"][s] for s in range(1, 7)]
    assert full_logs["loss/average"][3] == pytest.approx(sum(losses[:3]) / 3)
    assert full_logs["loss/average"][6] == pytest.approx(sum(losses[2:6]) / 4)


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_file(world, tmp_path, capsys):
    # a learning rate this large makes the weights overflow after the first step: the loss becomes NaN
    out = tmp_path / "out"
    argv = args(world, out, "--learning_rate=1e30", "--lr_scheduler=constant", "--save_every_n_steps=1", "--network_dropout=0")
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "training stopped at step 2: the loss is" in err, err[-2000:]
    assert f"the last good LoRA file is {out / 'tiny-step00000001.safetensors'}" in err
    files = sorted(p.name for p in out.iterdir())
    assert files == ["tiny-step00000001.safetensors"], "no file after the bad step, no lock or temporary left"
    assert all(torch.isfinite(t).all() for t in load_file(out / files[0]).values())
