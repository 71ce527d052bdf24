"""Saving: --save_last_n_* retention of files and states, --save_n_epoch_ratio, and state folder names."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import write_dreambooth_folder
from lorakit.config import parse_train_args
from lorakit.families.sd.tiny import build_tiny_sd, save_sd_diffusers_folder
from lorakit.training.run import train
from lorakit.training.saving import Retention, prune, retention_for, save_every_n_epochs


def touch(folder: Path, *names: str) -> None:
    for name in names:
        path = folder / name
        path.mkdir() if name.endswith("-state") else path.write_bytes(b"x")


def test_step_retention_keeps_the_last_n_steps(tmp_path):
    touch(tmp_path, *(f"lora-step{s:08d}.safetensors" for s in (2, 4, 6, 8)), "lora.safetensors", "other-step00000002.safetensors")
    prune(tmp_path, "lora", "safetensors", Retention(None, None, 4), step=8)
    # sd-scripts keeps files younger than K steps: after step 8 with K = 4 steps 4, 6 and 8 stay
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "lora-step00000004.safetensors", "lora-step00000006.safetensors", "lora-step00000008.safetensors",
        "lora.safetensors", "other-step00000002.safetensors"]


def test_epoch_retention_and_states(tmp_path):
    touch(tmp_path, *(f"epoch-{e:06d}.pt" for e in (2, 4, 6)), *(f"epoch-{e:06d}-state" for e in (2, 4, 6)))
    prune(tmp_path, None, "pt", Retention(2, 2, None), epoch=6)  # keep the last 2 saves: epochs 4 and 6
    prune(tmp_path, None, None, Retention(2, 1, None), epoch=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-000004.pt", "epoch-000006-state", "epoch-000006.pt"]


def test_state_retention_falls_back_to_model_retention():
    cfg = SimpleNamespace(save_every_n_epochs=1, save_n_epoch_ratio=None, save_last_n_epochs=3,
                          save_last_n_epochs_state=None, save_last_n_steps=5, save_last_n_steps_state=2)
    assert retention_for(cfg, 10, states=True) == Retention(1, 3, 2)
    assert retention_for(cfg, 10, states=False) == Retention(1, 3, 5)


@pytest.mark.parametrize("epochs,ratio,every", [(10, 3, 3), (2, 5, 1), (9, 3, 3)])
def test_save_n_epoch_ratio(epochs, ratio, every):
    cfg = SimpleNamespace(save_n_epoch_ratio=ratio, save_every_n_epochs=None)
    assert save_every_n_epochs(cfg, epochs) == every


def test_training_run_keeps_the_last_files_and_states(tmp_path):
    save_sd_diffusers_folder(build_tiny_sd("sd1", seed=0), tmp_path / "model")
    data = write_dreambooth_folder(tmp_path / "data", count=2, repeats=1)
    out = tmp_path / "out"
    cfg, _ = parse_train_args([
        f"--pretrained_model_name_or_path={tmp_path / 'model'}", f"--train_data_dir={data}", "--resolution=64",
        f"--output_dir={out}", "--output_name=t", "--network_module=networks.lora", "--network_dim=2",
        "--max_train_steps=6", "--learning_rate=1e-3", "--seed=1", "--max_data_loader_n_workers=0",
        "--network_train_unet_only", "--save_every_n_steps=1", "--save_last_n_steps=2", "--save_state",
        "--save_last_n_steps_state=1", "--save_every_n_epochs=1", "--save_last_n_epochs=1",
    ])
    train(cfg)
    # 2 batches per epoch, 3 epochs; the last step and the last epoch are only written as the final file.
    # After step 5, steps >= 5 - K stay: files of steps 3-5 (K = 2), states of steps 4-5 (K = 1).
    assert sorted(p.name for p in out.iterdir()) == [
        "t-000002-state", "t-000002.safetensors", "t-state", "t-step00000003.safetensors",
        "t-step00000004-state", "t-step00000004.safetensors", "t-step00000005-state", "t-step00000005.safetensors",
        "t.safetensors"]
