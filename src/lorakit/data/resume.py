"""Where a resumed run starts in the data (`--resume`, `--initial_step`, `--initial_epoch`, inventory §8.3).

With `--skip_until_initial_step` the run skips whole epochs, then the first batches of the next one through
`TrainDataset.skip_batches`, and sees exactly the batches an uninterrupted run would have seen (batch order
and augmentation seeds depend only on the seed, the epoch and the batch's position).

Two differences from sd-scripts, on purpose: the global step stays the absolute step (sd-scripts sets it to
the within-epoch remainder, appendix A.5), and steps map to batches with accelerate's end-of-epoch
synchronisation, ceil(batches / accumulation) steps per epoch, so the mapping is exact when the number of
batches is not a multiple of the accumulation steps.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ResumePoint:
    """The epoch to start (from 1), the batches of it to skip, and the optimizer step reached."""

    epoch: int
    skip_batches: int
    global_step: int


def steps_per_epoch(batches_per_epoch: int, gradient_accumulation_steps: int = 1) -> int:
    """Optimizer steps in one epoch: the last, partial accumulation also steps."""
    return -(-batches_per_epoch // max(1, gradient_accumulation_steps))


def initial_step_from_epoch(initial_epoch: int, batches_per_epoch: int, gradient_accumulation_steps: int = 1) -> int:
    """`--initial_epoch N` as a step: the steps of the N - 1 epochs before it."""
    return max(0, initial_epoch - 1) * steps_per_epoch(batches_per_epoch, gradient_accumulation_steps)


def resume_point(initial_step: int, batches_per_epoch: int, gradient_accumulation_steps: int = 1) -> ResumePoint:
    """Where optimizer step `initial_step` lies in the data: epoch, batches to skip in it, and the step."""
    per_epoch = steps_per_epoch(batches_per_epoch, gradient_accumulation_steps)
    if per_epoch <= 0:
        return ResumePoint(1, 0, initial_step)
    done_epochs, within = divmod(initial_step, per_epoch)
    skip = min(batches_per_epoch, within * max(1, gradient_accumulation_steps))
    return ResumePoint(done_epochs + 1, skip, initial_step)
