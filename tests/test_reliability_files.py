"""Files a run reads and writes: no code runs from a data file, the destination is checked before the work,
one run per output name, and a failed save neither loses the weights nor leaves partial files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import write_dreambooth_folder, write_tiny_checkpoints
from lorakit.cli.main import main

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


class Planted:
    """Unpickling this runs `touch MARKER`: what a malicious state or LoRA file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    """Replace `path` with a pickle that would create `marker` when loaded unsafely."""
    path.unlink(missing_ok=True)
    torch.save({"state": Planted(marker)}, path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    model = write_tiny_checkpoints(root, "sd1")["safetensors"]
    data = write_dreambooth_folder(root / "data")
    out = root / "trained"
    assert main(["train", *train_args(model, data, out, "--save_every_n_steps=1", "--save_state")]) == 0
    return {"root": root, "model": model, "data": data, "state": out / "tiny-step00000001-state", "lora": out / "tiny.safetensors"}


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", "--resolution=64",
            f"--output_dir={out}", "--output_name=tiny", "--network_module=networks.lora", "--max_train_steps=2",
            "--seed=1", *extra]


def one_line_failure(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "weights_only" not in err, err[-3000:]
    for text in expected:
        lines = [line for line in err.splitlines() if text in line]
        assert len(lines) == 1, (text, err)  # named, on one line
    return err


# ------------------------------------------------------------------------------------------ no code from files


STATE_FILES = ["model.safetensors", "optimizer.bin", "scheduler.bin", "scaler.pt", "random_states_0.pkl",
               "random_states_1.pkl", "train_state.json", "loss_average.json"]


@pytest.mark.parametrize("name", STATE_FILES)
def test_a_planted_pickle_in_any_state_file_runs_nothing(world, tmp_path, capsys, name):
    state = tmp_path / "tiny-step00000001-state"
    shutil.copytree(world["state"], state)
    marker = tmp_path / "code-ran"
    plant(state / name, marker)
    argv = ["train", *train_args(world["model"], world["data"], tmp_path / "out", f"--resume={state}")]
    one_line_failure(capsys, argv, str(state / name))
    assert not marker.exists(), "unpickling ran code from the state"
    assert not (tmp_path / "out").exists(), "refused before any model loads or file is written"


def test_a_state_of_an_earlier_version_with_numpy_arrays_still_loads(world, tmp_path):
    from lorakit.training.state import RNG_FILE, _torch_load, capture_rng, restore_rng

    state = np.random.get_state()
    old = {**capture_rng(None), "numpy": state}  # how earlier versions pickled NumPy's state: an ndarray
    torch.save(old, tmp_path / RNG_FILE)
    np.random.seed(123)
    restore_rng(_torch_load(tmp_path / RNG_FILE), None)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), state))


def test_planted_lora_and_model_files_are_refused_by_name(world, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    lora, model = tmp_path / "evil.pt", tmp_path / "evil.ckpt"
    plant(lora, marker)
    plant(model, marker)
    one_line_failure(capsys, ["lora", "inspect", str(lora)], f"{lora}: refused")
    one_line_failure(capsys, ["train", *train_args(model, world["data"], tmp_path / "a")], str(model))
    one_line_failure(capsys, ["train", *train_args(world["model"], world["data"], tmp_path / "b", f"--network_weights={lora}")],
                     f"{lora}: refused")
    assert not marker.exists()


CUSTOM_SCHEDULER = """
import pathlib
from torch.optim.lr_scheduler import LambdaLR

class WithAPath(LambdaLR):
    def __init__(self, optimizer):
        super().__init__(optimizer, lambda step: 1.0)
        self.log_folder = pathlib.Path("logs")  # an object in its state_dict: not plain data
"""


def test_a_state_that_could_not_be_resumed_is_not_published(world, tmp_path, capsys, monkeypatch):
    (tmp_path / "my_schedulers.py").write_text(CUSTOM_SCHEDULER)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    argv = ["train", *train_args(world["model"], world["data"], out, "--lr_scheduler_type=my_schedulers.WithAPath",
                                 "--save_every_n_steps=1", "--save_state")]
    one_line_failure(capsys, argv, f"{out / 'tiny-step00000001-state' / 'scheduler.bin'}: not saved, because it could not be resumed")
    assert sorted(p.name for p in out.iterdir()) == ["tiny-step00000001.safetensors"]


# ------------------------------------------------------------------------------------------ checks before work


def test_destination_problems_are_reported_together_before_anything_loads(world, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    argv = ["train", *train_args(tmp_path / "no-model-needed", world["data"], a_file / "out", f"--logging_dir={a_file}",
                                 "--dry_run")]
    one_line_failure(capsys, argv, f"--output_dir {a_file / 'out'}: cannot be made", f"--logging_dir {a_file}: is a file")
    argv = ["train", *train_args(world["model"], world["data"], a_file)]
    one_line_failure(capsys, argv, f"--output_dir {a_file}: is a file")
    out = tmp_path / "out"
    out.mkdir()
    argv = ["train", *train_args(world["model"], world["data"], out, "--output_name=missing/tiny")]
    one_line_failure(capsys, argv, f"the folder {out / 'missing'} does not exist")
    assert list(out.iterdir()) == []


@pytest.mark.skipif(ROOT, reason="root writes into read-only folders; the probe is tested with a file as parent")
def test_a_read_only_output_dir_is_refused_at_start_up(world, tmp_path, capsys):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    try:
        one_line_failure(capsys, ["train", *train_args(world["model"], world["data"], out / "sub")], "cannot write there")
    finally:
        out.chmod(0o755)


def test_linked_state_names_are_refused(world, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny-state").symlink_to(tmp_path / "elsewhere")  # a link to nothing
    argv = ["train", *train_args(world["model"], world["data"], out, "--save_state")]
    one_line_failure(capsys, argv, f"--output_name: {out / 'tiny-state'} is a symbolic link")
    dangling = tmp_path / "resume-link"
    dangling.symlink_to(tmp_path / "gone")
    argv = ["train", *train_args(world["model"], world["data"], tmp_path / "o2", f"--resume={dangling}")]
    one_line_failure(capsys, argv, f"--resume {dangling}: no such state folder (a symbolic link to")


# ------------------------------------------------------------------------------------------ two runs, one name

HOLDER = """
import sys, time
from pathlib import Path
from lorakit.training.locks import OutputLock
OutputLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_locked_output_name_stops_at_start_up(world, tmp_path, capsys, caplog):
    out = tmp_path / "shared"
    out.mkdir()
    first_files = {"tiny.safetensors": world["lora"].read_bytes(), "tiny-state": None}
    (out / "tiny.safetensors").write_bytes(first_files["tiny.safetensors"])
    shutil.copytree(world["state"], out / "tiny-state")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    lock = out / ".tiny.lock"
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert first.stdout.readline().strip() == "locked"
        argv = ["train", *train_args(world["model"], world["data"], out, "--save_state")]
        err = one_line_failure(capsys, argv, f"is in use by PID {first.pid}")
        assert str(lock) in err
        after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p != lock}
        assert after == before, "the first run's files are untouched"
    finally:
        first.kill()
        first.wait()
    # the holder died without cleaning up: its lock is stale and the next run takes it over, with a message
    from lorakit.training.locks import OutputLock

    with caplog.at_level("WARNING"), OutputLock(lock):
        assert f"taking over the lock of PID {first.pid}" in caplog.text
    assert not lock.exists()


def test_a_lock_written_on_another_host_is_respected(tmp_path):
    from lorakit.errors import ConfigError
    from lorakit.training.locks import OutputLock

    lock = tmp_path / ".tiny.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "another-machine", "started": "yesterday"}))
    with pytest.raises(ConfigError, match="in use by PID 1 on another-machine"):
        OutputLock(lock).acquire()
    assert lock.exists()


# ------------------------------------------------------------------------------------------ failed saves


def test_a_full_disk_while_saving_a_state_is_one_line_and_leaves_no_partial_folder(world, tmp_path, capsys, monkeypatch):
    import lorakit.training.state as state

    real = state._write_file

    def disk_full(path, write):
        if path.name == "optimizer.bin":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, write)

    monkeypatch.setattr(state, "_write_file", disk_full)
    out = tmp_path / "out"
    argv = ["train", *train_args(world["model"], world["data"], out, "--save_every_n_steps=1", "--save_state")]
    one_line_failure(capsys, argv, f"cannot write the training state {out / 'tiny-step00000001-state'}: No space left on device")
    assert sorted(p.name for p in out.iterdir()) == ["tiny-step00000001.safetensors"], "no staging folder, no lock"


def test_a_failed_final_save_keeps_the_trained_weights_elsewhere(world, tmp_path, capsys, monkeypatch):
    import lorakit.adapters.formats as formats

    out = tmp_path / "out"
    real = formats._write_atomically

    def vanished_folder(path, write):
        if Path(path).parent == out:
            raise formats.CheckpointError(f"cannot write {path}: No space left on device")
        real(path, write)

    monkeypatch.setattr(formats, "_write_atomically", vanished_folder)
    err = one_line_failure(capsys, ["train", *train_args(world["model"], world["data"], out)],
                           f"cannot write {out / 'tiny.safetensors'}: No space left on device")
    rescued = Path(err.split("the trained weights were written to ")[1].split(" instead")[0])
    assert rescued.name == "tiny.safetensors" and rescued.parent.name.startswith("lorakit-rescue-")
    tensors = load_file(rescued)
    assert tensors and any(k.endswith("lora_up.weight") and v.abs().sum() > 0 for k, v in tensors.items())
    shutil.rmtree(rescued.parent)
    assert not out.exists(), "nothing partial is left (the folder made for the run is removed again)"


def test_an_unreadable_class_folder_is_one_line_naming_it(world, tmp_path, capsys, monkeypatch):
    data = write_dreambooth_folder(tmp_path / "data")
    folder = data / "2_sks toy"
    real = Path.iterdir

    def denied(self):
        if self == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    one_line_failure(capsys, ["train", *train_args(world["model"], data, tmp_path / "out", "--dry_run")],
                     f"image folder {folder} cannot be read (Permission denied)")


@pytest.mark.skipif(ROOT, reason="root reads folders without read permission")
def test_an_unreadable_class_folder_by_permissions(world, tmp_path, capsys):
    data = write_dreambooth_folder(tmp_path / "data")
    folder = data / "2_sks toy"
    folder.chmod(0)
    try:
        one_line_failure(capsys, ["train", *train_args(world["model"], data, tmp_path / "out", "--dry_run")], str(folder))
    finally:
        folder.chmod(0o755)


def test_leftovers_of_a_killed_run_are_tidied_only_for_its_own_output_name(tmp_path):
    from types import SimpleNamespace

    from lorakit.training.destination import clean_stale_temporaries

    (tmp_path / ".tiny.safetensors.k2j4x9_a.tmp").write_bytes(b"half a file")
    (tmp_path / ".tiny-step00000004-state.abcdefgh.tmp").mkdir()
    aside = tmp_path / ".tiny-state.zzzz1111.old"  # killed between renaming the old state aside and the new in
    aside.mkdir()
    (aside / "train_state.json").write_text("{}")
    (tmp_path / ".other.safetensors.k2j4x9_a.tmp").write_bytes(b"another run's save in progress")
    removed = clean_stale_temporaries(SimpleNamespace(output_dir=str(tmp_path), output_name="tiny"))
    assert sorted(p.name for p in removed) == [".tiny-step00000004-state.abcdefgh.tmp", ".tiny.safetensors.k2j4x9_a.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.safetensors.k2j4x9_a.tmp", "tiny-state"]
    assert (tmp_path / "tiny-state" / "train_state.json").is_file(), "the complete old state is put back"
