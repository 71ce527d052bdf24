"""Per-step losses: logged to the trackers, averaged as sd-scripts averages them, and checked to be finite.

Reading a loss from the GPU makes the CPU wait for it, so the loop keeps each step's loss as a device tensor
and `LossLog.flush` reads all waiting ones with one transfer at the interval the loop already synchronises at
(and before every save). Each step is then logged with its own step number (`loss/current`, and
`loss/average`, the moving average over the last epoch's steps, sd-scripts' `LossRecorder`), and a NaN or
infinite loss stops the run naming its step, before any file is written from weights it has spoiled.

The moving average's window is part of a saved training state (`state_dict`), so a resumed run logs exactly
what the uninterrupted run logged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lorakit.errors import TrainingStopped


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as logged: its loss, the moving average after it and the learning rates it used."""

    step: int
    loss: float
    average: float
    lrs: list[float]


class MovingAverage:
    """sd-scripts' `LossRecorder`: during the first epoch the mean of all steps so far; later, each step
    replaces the value of the same step of the previous epoch, so the window is one epoch long."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.total = 0.0

    def add(self, epoch: int, index: int, loss: float) -> None:
        """`loss` of step `index` (0-based) of `epoch` (from 1)."""
        if epoch <= 1:
            self.values.append(loss)
        else:
            while len(self.values) <= index:
                self.values.append(0.0)
            self.total -= self.values[index]
            self.values[index] = loss
        self.total += loss

    @property
    def average(self) -> float:
        return self.total / len(self.values) if self.values else float("nan")

    def state_dict(self) -> dict[str, Any]:
        # the running total is kept, not re-summed, so a resumed run continues with the very same float
        return {"values": list(self.values), "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = [float(v) for v in state["values"]]
        self.total = float(state["total"])


class LossLog:
    """Losses of the steps since the last flush, on the device, and the moving average of all steps."""

    def __init__(self, steps_per_epoch: int, any_process: Callable[[bool], bool] = lambda flag: flag):
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.pending: list[tuple[int, int, torch.Tensor, list[float]]] = []
        self.average = MovingAverage()
        self.any_process = any_process  # with several processes all must stop together, or the others wait forever
        self.last_saved: Callable[[], Path | None] = lambda: None  # for the message when a loss is not finite

    def add(self, step: int, epoch: int, loss: torch.Tensor, lrs: list[float]) -> None:
        self.pending.append((step, epoch, loss.detach(), list(lrs)))

    def flush(self) -> list[StepRecord]:
        """The waiting steps as records (one device-to-host transfer); `TrainingStopped` at a NaN/Inf loss."""
        if not self.pending:
            return []
        pending, self.pending = self.pending, []
        values = torch.stack([loss.float().reshape(()) for _, _, loss, _ in pending]).cpu().tolist()
        bad = next(((step, value) for (step, *_), value in zip(pending, values) if not math.isfinite(value)), None)
        if self.any_process(bad is not None):
            step, value = bad or (pending[-1][0], float("nan"))  # (another process's loss)
            raise TrainingStopped(non_finite_message(step, value, self.last_saved()))
        records = []
        for (step, epoch, _, lrs), value in zip(pending, values):
            self.average.add(epoch, (step - 1) % self.steps_per_epoch, value)
            records.append(StepRecord(step, value, self.average.average, lrs))
        return records


def non_finite_message(step: int, value: float, last_saved: Path | None, what: str = "the loss") -> str:
    kind = "not a number (NaN)" if math.isnan(value) else "infinite"
    kept = f"the last good LoRA file is {last_saved}" if last_saved else "no LoRA file had been saved yet"
    return (f"training stopped at step {step}: {what} is {kind}, so the weights would be spoiled from here on; "
            f"{kept}. Lower --learning_rate, use --mixed_precision bf16 instead of fp16, or check that step's "
            "images and captions")


def require_finite_weights(params: list[torch.nn.Parameter], step: int, last_saved: Path | None) -> None:
    """Refuse to save weights that hold a NaN or infinity (one device sync, at save time)."""
    if not params:
        return
    finite = torch.stack([torch.isfinite(p.detach()).all() for p in params]).all()
    if not bool(finite):
        raise TrainingStopped(non_finite_message(step, float("nan"), last_saved, what="a LoRA weight"))


def any_process(accelerator: Any) -> Callable[[bool], bool]:
    """Whether a flag is set on any process (one small all-reduce); the flag itself with one process."""
    if accelerator.num_processes <= 1:
        return lambda flag: flag

    def reduced(flag: bool) -> bool:
        count = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
        return bool(count.item() > 0)

    return reduced
