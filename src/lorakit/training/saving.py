"""When to save and what the files are called (sd-scripts' names, so existing scripts find them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def epoch_file_name(output_name: str | None, epoch: int, ext: str) -> str:
    return f"{output_name or 'epoch'}-{epoch:06d}.{ext}"


def step_file_name(output_name: str | None, step: int, ext: str) -> str:
    return f"{output_name or 'at'}-step{step:08d}.{ext}"


def final_file_name(output_name: str | None, ext: str) -> str:
    return f"{output_name or 'last'}.{ext}"


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


def save_dtype(cfg: Any) -> torch.dtype | None:
    return SAVE_DTYPES[cfg.save_precision] if cfg.save_precision else None


def output_path(cfg: Any, file_name: str) -> Path:
    folder = Path(cfg.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / file_name
