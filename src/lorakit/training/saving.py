"""When to save, what the files and state folders are called, and which old ones to delete.

Names follow sd-scripts (inventory §8.1) so existing scripts find them (built by
`lorakit.adapters.formats.lora_file_name` / `state_dir_name`):
`NAME-000004.safetensors`, `NAME-step00000100.safetensors`, `NAME.safetensors`, and the state folders
`NAME-000004-state`, `NAME-step00000100-state`, `NAME-state`.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("lorakit")

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class SavePolicy:
    """Which epochs and steps get a file; the last epoch is only written as the final file."""

    every_n_epochs: int | None
    every_n_steps: int | None
    num_epochs: int

    def after_epoch(self, epoch: int) -> bool:
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0 and epoch < self.num_epochs

    def after_step(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0


def save_every_n_epochs(cfg: Any, num_epochs: int) -> int | None:
    """--save_every_n_epochs, or from --save_n_epoch_ratio R: floor(epochs / R), at least 1 (sd-scripts)."""
    if cfg.save_n_epoch_ratio:
        return max(1, num_epochs // cfg.save_n_epoch_ratio)
    return cfg.save_every_n_epochs


@dataclass(frozen=True)
class Retention:
    """How many epoch/step files and states to keep (None keeps all), sd-scripts §8.2.

    After saving epoch e, epochs at or below e − every_n_epochs·K go; after saving step s, steps below s − K go
    (sd-scripts deletes one file, the multiple of save_every_n_steps at or below s − K − 1; deleting every older
    one also cleans up after a resumed run whose step grid differs).
    """

    every_n_epochs: int | None
    last_n_epochs: int | None
    last_n_steps: int | None

    def epoch_cutoff(self, epoch: int) -> int | None:
        if not self.last_n_epochs or not self.every_n_epochs:
            return None
        return epoch - self.every_n_epochs * self.last_n_epochs

    def step_cutoff(self, step: int) -> int | None:
        return None if not self.last_n_steps else step - self.last_n_steps


def retention_for(cfg: Any, num_epochs: int, *, states: bool) -> Retention:
    """Retention of model files, or of states (whose own settings fall back to the model ones)."""
    every = save_every_n_epochs(cfg, num_epochs)
    if states:
        return Retention(every, cfg.save_last_n_epochs_state or cfg.save_last_n_epochs,
                         cfg.save_last_n_steps_state or cfg.save_last_n_steps)
    return Retention(every, cfg.save_last_n_epochs, cfg.save_last_n_steps)


def _numbered(folder: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    found = []
    for path in folder.iterdir() if folder.is_dir() else []:
        match = pattern.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return found


def prune(folder: Path, output_name: str | None, ext: str | None, retention: Retention, *, epoch: int | None = None,
          step: int | None = None) -> list[Path]:
    """Delete the epoch (or step) files — or state folders when `ext` is None — that fall out of `retention`."""
    if epoch is not None:
        cutoff = retention.epoch_cutoff(epoch)
        base, middle, keep_above = output_name or "epoch", r"(\d{6})", True
    else:
        cutoff = retention.step_cutoff(step or 0)
        base, middle, keep_above = output_name or "at", r"step(\d{8})", False
    if cutoff is None:
        return []
    # a file may have companions written with it (`-ema`: the EMA weights of a checkpoint); "" is a folder
    suffix = "-state" if ext is None else "(?:-ema)?" + (re.escape(f".{ext.lstrip('.')}") if ext else "")
    pattern = re.compile(re.escape(base) + "-" + middle + suffix)
    removed = []
    for number, path in _numbered(folder, pattern):
        old = number <= cutoff if keep_above else number < cutoff
        if old:
            path.unlink() if path.is_symlink() or not path.is_dir() else shutil.rmtree(path)  # a link, not its target
            log.info("removed old %s", path)
            removed.append(path)
    return removed


def save_dtype(cfg: Any) -> torch.dtype | None:
    return SAVE_DTYPES[cfg.save_precision] if cfg.save_precision else None


def output_path(cfg: Any, file_name: str) -> Path:
    folder = Path(cfg.output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # the save that follows names the problem (and keeps the weights elsewhere: training.rescue)
    return folder / file_name
