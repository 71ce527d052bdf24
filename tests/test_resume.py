"""Exact resume: a run continued from a saved state gives the same losses and weights, bit for bit on the CPU,
and a process killed in the middle of writing a state leaves no corrupt file behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import resume_args, write_resume_world
from lorakit.config import parse_train_args
from lorakit.errors import ConfigError
from lorakit.training.run import train
from lorakit.training.state import TRAIN_STATE_FILE


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return write_resume_world(tmp_path_factory.mktemp("resume"))


def args(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return resume_args(world, out, "--max_data_loader_n_workers=0", *extra)


def run(argv: list[str]):
    cfg, _ = parse_train_args(argv)
    return train(cfg)


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    result = run(args(world, out, "--save_every_n_steps=3", "--save_state"))
    return out, result


def test_resume_reproduces_losses_and_weights(world, uninterrupted, tmp_path):
    full_out, full = uninterrupted
    state = full_out / "tiny-step00000003-state"
    assert json.loads((state / TRAIN_STATE_FILE).read_text()) == {"current_epoch": 1, "current_step": 3}
    resumed = run(args(world, tmp_path, f"--resume={state}"))
    assert resumed.start_step == 3 and len(full.step_losses) == 6 and len(resumed.step_losses) == 3
    assert resumed.step_losses == full.step_losses[3:]  # exact float equality
    a, b = load_file(full_out / "tiny.safetensors"), load_file(tmp_path / "tiny.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (full_out / "tiny-state").is_dir(), "--save_state also writes the final state"


def test_resume_rejects_a_finished_state(world, uninterrupted, tmp_path):
    full_out, _ = uninterrupted
    with pytest.raises(ConfigError, match="would start at step 6"):
        run(args(world, tmp_path, f"--resume={full_out / 'tiny-state'}"))
    with pytest.raises(ConfigError, match="no such state folder"):
        run(args(world, tmp_path, f"--resume={tmp_path / 'missing-state'}"))


def test_resume_refuses_changes_the_state_would_overrule(world, uninterrupted, tmp_path, monkeypatch):
    """The state's optimizer holds the learning rate, its tensors the rank, its random streams the seed: changed
    on the command line they could not take effect, so each is refused by name before the model loads."""
    from lorakit.families.registry import get_family

    def must_not_load(*_args, **_kwargs):
        raise AssertionError("the model was loaded although the resume was refused")

    monkeypatch.setattr(type(get_family("sd")), "load", must_not_load)
    state = uninterrupted[0] / "tiny-step00000003-state"
    with pytest.raises(ConfigError) as refused:
        run(args(world, tmp_path, f"--resume={state}", "--learning_rate=5e-4", "--network_dim=8", "--seed=4"))
    problems = refused.value.problems
    assert len(problems) == 3, problems
    for option, old in (("learning_rate", "0.001"), ("network_dim", "4"), ("seed", "3")):
        assert any(f"--{option} was {old} when the state was saved" in p and f"give --{option} {old}" in p
                   for p in problems), problems


def test_resume_reports_the_changes_that_take_effect(world, uninterrupted, tmp_path, caplog):
    """A longer run from the same state: the change is said once, it takes effect, and the file's metadata
    records what was trained."""
    state = uninterrupted[0] / "tiny-step00000003-state"
    with caplog.at_level("WARNING", logger="lorakit"):
        resumed = run(args(world, tmp_path, f"--resume={state}", "--max_train_steps=8"))
    assert any("--max_train_steps was 6 when the state was saved and is 8 now" in r.message for r in caplog.records)
    assert resumed.start_step == 3 and len(resumed.step_losses) == 5
    saved = (state / "run_options.json").read_text()
    assert json.loads(saved)["max_train_steps"] == 6 and str(world["model"].parent) not in saved, "no machine paths"
    from safetensors import safe_open

    with safe_open(tmp_path / "tiny.safetensors", "pt") as f:
        assert f.metadata()["ss_max_train_steps"] == "8"


KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    import lorakit.training.state as state
    from lorakit.config import parse_train_args
    from lorakit.training.run import train

    real_write, writes = state._write_file, []

    def write_then_die(path, write):
        real_write(path, write)
        writes.append(path)
        if "step00000004-state" in str(path) and len(writes) > 1:
            os.kill(os.getpid(), signal.SIGKILL)  # the power goes out half-way through the second state

    state._write_file = write_then_die
    torch.set_num_threads(1)  # as in the test process (conftest), so the arithmetic is the same bit for bit
    cfg, _ = parse_train_args(sys.argv[1:])
    train(cfg)
""")


def test_killed_during_a_state_save_resumes_cleanly(world, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", KILLER, *args(world, out, "--save_every_n_steps=2", "--save_state")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    staging = [n for n in names if n.startswith(".tiny-step00000004-state.") and n.endswith(".tmp")]
    assert "tiny-step00000004-state" not in names and len(staging) == 1
    assert "tiny.safetensors" not in names
    for lora in out.glob("*.safetensors"):
        load_file(lora)  # every LoRA file present is complete
    assert [n for n in names if n.startswith(".")] == sorted(staging + [".tiny.lock"]), \
        "no temporary files of LoRA saves are left; the killed run's lock is"

    resumed = run(args(world, out, f"--resume={out / 'tiny-step00000002-state'}", "--save_every_n_steps=2", "--save_state"))
    full_out, full = uninterrupted
    assert resumed.step_losses == full.step_losses[2:]
    a, b = load_file(full_out / "tiny.safetensors"), load_file(out / "tiny.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    names = {p.name for p in out.iterdir()}
    assert "tiny-step00000004-state" in names
    assert not [n for n in names if n.endswith((".tmp", ".old", ".lock"))], "the killed run's leftovers are cleaned up"


def test_initial_step_with_skip_starts_mid_epoch(world, uninterrupted, tmp_path):
    _, full = uninterrupted
    result = run(args(world, tmp_path, "--initial_step=5", "--skip_until_initial_step"))
    assert result.start_step == 5 and len(result.step_losses) == 1
    plain = run(args(world, tmp_path / "plain", "--initial_epoch=2"))
    assert plain.start_step == 4 and len(plain.step_losses) == 2
