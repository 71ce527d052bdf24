"""Outputs are written under a temporary name, renamed into place, and readable like any file the user makes."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from lorakit.adapters.formats import save_lora_file
from lorakit.atomic import default_permissions, staged_file, staged_folder
from lorakit.checkpoint_io import write_safetensors_atomic


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_get_umask_permissions_not_private_ones(tmp_path, umask_022):
    lora = tmp_path / "my_lora.safetensors"
    save_lora_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 3)}, lora)
    model = tmp_path / "model.safetensors"
    write_safetensors_atomic({"w": torch.zeros(2)}, model)
    assert _mode(lora) == _mode(model) == 0o644  # a ComfyUI server running as another user can read them
    with staged_folder(tmp_path / "folder") as staging:
        (staging / "a.txt").write_text("x")
    assert _mode(tmp_path / "folder") == 0o755
    assert default_permissions() == 0o644 and default_permissions(folder=True) == 0o755


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with staged_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / "model") as staging:
            (staging / "part").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
