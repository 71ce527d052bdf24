"""The numbers of a run, computed before any model loads, and the plan printed at start and by --dry_run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorakit.data.resume import ResumePoint


@dataclass(frozen=True)
class TrainingPlan:
    family: str
    batches_per_epoch: int
    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int
    warmup_steps: int
    num_processes: int


def make_plan(cfg: Any, family: str, batches_per_epoch: int, num_processes: int = 1) -> TrainingPlan:
    """Steps per epoch and totals as sd-scripts computes them (--max_train_epochs overrides the steps)."""
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / num_processes / cfg.gradient_accumulation_steps))
    if cfg.max_train_epochs:
        max_steps = cfg.max_train_epochs * steps_per_epoch
    else:
        max_steps = cfg.max_train_steps
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    warmup = cfg.resolve_warmup_steps(max_steps) if hasattr(cfg, "resolve_warmup_steps") else int(cfg.lr_warmup_steps or 0)
    return TrainingPlan(family, batches_per_epoch, steps_per_epoch, max_steps, num_epochs, warmup, num_processes)


def format_plan(cfg: Any, plan: TrainingPlan, dataset_text: str, network_module: str | None = None) -> str:
    lines = [
        "Training plan",
        f"  family            {plan.family}",
        f"  base model        {cfg.pretrained_model_name_or_path}",
        _trains_line(cfg, network_module or cfg.network_module),
        dataset_text.rstrip(),
        f"  batches per epoch {plan.batches_per_epoch}"
        + (f" (over {plan.num_processes} processes)" if plan.num_processes > 1 else ""),
        f"  steps per epoch   {plan.steps_per_epoch} (gradient accumulation {cfg.gradient_accumulation_steps})",
        f"  epochs            {plan.num_epochs}",
        f"  total steps       {plan.max_train_steps} (warm-up {plan.warmup_steps})",
        f"  output            {cfg.output_dir}/{cfg.output_name or 'last'}"
        + ("" if getattr(cfg, "trains_model_weights", False) else f".{cfg.save_model_as}"),
    ]
    return "\n".join(lines)


def _trains_line(cfg: Any, network_module: str | None) -> str:
    """What the run trains: the adapter network, or the model's own weights (`lorakit finetune`)."""
    if getattr(cfg, "trains_model_weights", False):
        encoders = "and text encoder(s)" if cfg.trains_text_encoder else "only (text encoders frozen)"
        return f"  trains            the model's own weights: denoiser {encoders}"
    return (f"  network           {network_module} dim={cfg.network_dim or 4} alpha={cfg.network_alpha}"
            + (f" args={cfg.network_args}" if cfg.network_args else ""))


def start_position(cfg: Any, plan: TrainingPlan, resumed_step: int | None) -> ResumePoint:
    """Where training starts: step, epoch and batches to skip (inventory §8.3, without its step defect).

    The step is --initial_step, else --initial_epoch's first step, else the resumed state's step. With --resume
    or --skip_until_initial_step the run continues at exactly that batch; otherwise (sd-scripts' plain
    --initial_step) it starts at the beginning of the epoch holding that step. The global step always stays
    the absolute step.
    """
    from lorakit.data.resume import ResumePoint, initial_step_from_epoch, resume_point

    accumulation = cfg.gradient_accumulation_steps
    if cfg.initial_step is not None:
        step = cfg.initial_step
    elif cfg.initial_epoch is not None:
        step = initial_step_from_epoch(cfg.initial_epoch, plan.batches_per_epoch, accumulation)
    elif resumed_step is not None:
        step = resumed_step
    else:
        return ResumePoint(1, 0, 0)
    point = resume_point(step, plan.batches_per_epoch, accumulation)
    if resumed_step is None and not cfg.skip_until_initial_step:
        return ResumePoint(point.epoch, 0, step)
    return point


def initial_step_problem(cfg: Any, plan: TrainingPlan, resumed_step: int | None) -> str | None:
    """A message when the run would start at or after its last step (sd-scripts asserts this)."""
    point = start_position(cfg, plan, resumed_step)
    if point.global_step < plan.max_train_steps:
        return None
    source = "--initial_step" if cfg.initial_step is not None else "--initial_epoch" if cfg.initial_epoch is not None else f"--resume {cfg.resume}"
    return (f"{source}: training would start at step {point.global_step}, but the run has only "
            f"{plan.max_train_steps} steps; raise --max_train_steps or --max_train_epochs")
