"""What one run is made of: the loaded session the step function works on, and what a run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from lorakit.families.base import Components, ModelFamily
from lorakit.training import metadata as md
from lorakit.training.plan import TrainingPlan
from lorakit.training.trainable import Trainable

@dataclass
class TrainResult:
    plan: TrainingPlan
    saved_files: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # mean loss over each logging interval
    step_losses: list[float] = field(default_factory=list)  # one per optimizer step run by this process
    start_step: int = 0  # the global step the run started from (non-zero when resumed)
    sample_files: list[Path] = field(default_factory=list)
    step_end_times: list[float] = field(default_factory=list)  # perf_counter after each optimizer step
    validations: list[Any] = field(default_factory=list)  # the run's validation losses (training/validation.py)


@dataclass
class Session:
    """Everything the step function needs; built once by `setup`."""

    cfg: Any
    family: ModelFamily
    comps: Components
    trainable: Trainable  # what the run trains (its parameters, file format and state)
    objective: Any
    accelerator: Accelerator
    weight_dtype: torch.dtype
    noise_generator: torch.Generator | None = None  # set by the trainer; draws training noise and timesteps
    base_hashes: md.BaseModelHashes = field(default_factory=md.BaseModelHashes)  # the base model's metadata hashes
