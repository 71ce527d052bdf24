"""Learning-rate schedules named as in sd-scripts (`get_scheduler_fix`), which takes them from transformers/diffusers.

Each built-in schedule is a pure function of the optimizer step returning a multiplier of the base LR, so that
tests can check it against its formula and against the transformers/diffusers implementation. The options of
each schedule are its keyword-only parameters: sd-scripts' flags fill some (`--lr_scheduler_num_cycles`,
`--lr_scheduler_power`, ...) and `--lr_scheduler_args` may set any of them.

Special cases, as in sd-scripts:
  * schedule-free optimizers get no schedule: a `ReportingScheduler` that only reports the LRs;
  * Adafactor with relative_step owns its step size: transformers' `AdafactorSchedule` reports it;
  * `--lr_scheduler_type X` builds any `torch.optim.lr_scheduler.X` or `module.Class` as `X(optimizer, **args)`.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lorakit.errors import ConfigError
from lorakit.training.optim import OptimizerHandle, class_from, import_module, is_schedule_free

Factor = Callable[[int], float]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduleSteps:
    """Step counts of a run (already multiplied by the number of processes) and the optimizer's base LR."""

    warmup: int
    total: int
    decay: int = 0
    base_lr: float = 1.0


def _warmup(step: int, warmup: int) -> float | None:
    """Linear warm-up from 0 to 1 over `warmup` steps; None once it is over."""
    return step / max(1, warmup) if step < warmup else None


def _progress(step: int, s: ScheduleSteps) -> float:
    """Fraction of the post-warm-up steps done."""
    return (step - s.warmup) / max(1, s.total - s.warmup)


def constant(s: ScheduleSteps) -> Factor:
    """The base LR throughout."""
    return lambda step: 1.0


def constant_with_warmup(s: ScheduleSteps) -> Factor:
    """Linear warm-up, then the base LR."""
    return lambda step: w if (w := _warmup(step, s.warmup)) is not None else 1.0


def linear(s: ScheduleSteps) -> Factor:
    """Linear warm-up, then linear decay to 0 at the last step."""

    def factor(step: int) -> float:
        if (w := _warmup(step, s.warmup)) is not None:
            return w
        return max(0.0, (s.total - step) / max(1, s.total - s.warmup))

    return factor


def cosine(s: ScheduleSteps, *, num_cycles: float = 0.5) -> Factor:
    """Linear warm-up, then ½(1 + cos(2π·cycles·progress)); the default half wave ends at 0 (arXiv:1608.03983)."""

    def factor(step: int) -> float:
        if (w := _warmup(step, s.warmup)) is not None:
            return w
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * _progress(step, s))))

    return factor


def cosine_with_restarts(s: ScheduleSteps, *, num_cycles: int = 1) -> Factor:
    """Linear warm-up, then `num_cycles` half-cosines from 1 to 0, each restarting at 1 (hard restarts)."""

    def factor(step: int) -> float:
        if (w := _warmup(step, s.warmup)) is not None:
            return w
        progress = _progress(step, s)
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))

    return factor


def polynomial(s: ScheduleSteps, *, power: float = 1.0, lr_end: float = 1e-7) -> Factor:
    """Linear warm-up, then (lr0 − lr_end)·remaining^power + lr_end, as a multiplier of lr0 (BERT's decay)."""
    if not s.base_lr > lr_end:
        raise ConfigError([f"--lr_scheduler polynomial: lr_end ({lr_end}) must be below the learning rate "
                           f"({s.base_lr})"])

    def factor(step: int) -> float:
        if (w := _warmup(step, s.warmup)) is not None:
            return w
        if step > s.total:
            return lr_end / s.base_lr
        remaining = 1 - (step - s.warmup) / max(1, s.total - s.warmup)
        return ((s.base_lr - lr_end) * remaining**power + lr_end) / s.base_lr

    return factor


def inverse_sqrt(s: ScheduleSteps, *, timescale: int | None = None) -> Factor:
    """Linear warm-up, then 1/sqrt((step + timescale − warmup)/timescale); timescale defaults to warmup or 10,000."""
    scale = timescale or s.warmup or 10_000

    def factor(step: int) -> float:
        if (w := _warmup(step, s.warmup)) is not None:
            return w
        return 1.0 / math.sqrt((step + scale - s.warmup) / scale)

    return factor


def cosine_with_min_lr(
    s: ScheduleSteps, *, num_cycles: float = 0.5, min_lr_rate: float | None = None, min_lr: float | None = None
) -> Factor:
    """`cosine` rescaled to end at min_lr_rate (or min_lr / base LR) instead of 0."""
    if min_lr is not None and min_lr_rate is not None:
        raise ConfigError(["--lr_scheduler cosine_with_min_lr: give min_lr or min_lr_rate, not both"])
    if min_lr is not None:
        min_lr_rate = min_lr / s.base_lr
    if min_lr_rate is None:
        raise ConfigError(["--lr_scheduler cosine_with_min_lr requires --lr_scheduler_min_lr_ratio"])
    rate = float(min_lr_rate)

    def factor(step: int) -> float:
        if (w := _warmup(step, s.warmup)) is not None:
            return w
        wave = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * _progress(step, s)))
        return max(0.0, wave * (1 - rate) + rate)

    return factor


_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda p: p,
    "cosine": lambda p: 0.5 * (1.0 - math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1.0 - math.sqrt(1.0 - p),
}


def warmup_stable_decay(
    s: ScheduleSteps,
    *,
    num_stable_steps: int | None = None,
    warmup_type: str = "linear",
    decay_type: str = "cosine",
    min_lr_ratio: float = 0.0,
    num_cycles: float = 0.5,
) -> Factor:
    """Warm-up from min_lr_ratio to 1, hold, then decay to min_lr_ratio over the decay steps (WSD, arXiv:2404.06395).

    The stable phase fills what warm-up and decay leave of the total unless `num_stable_steps` is given; after
    the three phases the multiplier stays at min_lr_ratio.
    """
    for label, kind in (("warmup_type", warmup_type), ("decay_type", decay_type)):
        if kind not in _SHAPES:
            raise ConfigError([f"--lr_scheduler_args {label}={kind!r}: expected one of {', '.join(_SHAPES)}"])
    stable = s.total - s.warmup - s.decay if num_stable_steps is None else num_stable_steps
    if stable < 0:
        raise ConfigError([f"--lr_scheduler warmup_stable_decay: warm-up ({s.warmup}) + decay ({s.decay}) steps "
                           f"exceed the {s.total} training steps"])
    ratio = float(min_lr_ratio)

    def decay_shape(p: float) -> float:
        if decay_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * p))
        return 1.0 - _SHAPES[decay_type](p)

    def factor(step: int) -> float:
        if step < s.warmup:
            return max(0.0, _SHAPES[warmup_type](step / max(1, s.warmup)) * (1.0 - ratio) + ratio)
        if step < s.warmup + stable:
            return 1.0
        if step < s.warmup + stable + s.decay:
            p = (step - s.warmup - stable) / max(1, s.decay)
            return max(0.0, decay_shape(p) * (1.0 - ratio) + ratio)
        return ratio

    return factor


def piecewise_constant(s: ScheduleSteps, *, step_rules: str | None = None) -> Factor:
    """Multipliers by step range: "1:10,0.1:20,0.01" is 1 before step 10, 0.1 before 20, 0.01 after (diffusers)."""
    if not step_rules:
        raise ConfigError(['--lr_scheduler piecewise_constant needs --lr_scheduler_args "step_rules=\'1:10,0.1\'"'])
    *pairs, last = str(step_rules).split(",")
    try:
        rules = sorted((int(steps), float(value)) for value, steps in (p.split(":") for p in pairs))
        final = float(last)
    except ValueError as exc:
        raise ConfigError([f"--lr_scheduler_args step_rules={step_rules!r}: expected 'value:step,...,value' "
                           f"({exc})"]) from exc

    def factor(step: int) -> float:
        return next((value for until, value in rules if step < until), final)

    return factor


SCHEDULES: dict[str, Callable[..., Factor]] = {
    "constant": constant,
    "constant_with_warmup": constant_with_warmup,
    "linear": linear,
    "cosine": cosine,
    "cosine_with_restarts": cosine_with_restarts,
    "polynomial": polynomial,
    "inverse_sqrt": inverse_sqrt,
    "cosine_with_min_lr": cosine_with_min_lr,
    "warmup_stable_decay": warmup_stable_decay,
    "piecewise_constant": piecewise_constant,
}

# Schedules whose formula has no warm-up; sd-scripts raises when --lr_warmup_steps is given with them.
NO_WARMUP = frozenset({"constant", "piecewise_constant", "adafactor"})


def options_of(name: str) -> list[str]:
    """The keyword options a built-in schedule accepts (what --lr_scheduler_args may set)."""
    params = inspect.signature(SCHEDULES[name]).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def schedule_factor(name: str, steps: ScheduleSteps, **options: Any) -> Factor:
    """The multiplier function of a built-in schedule, or a ConfigError naming what is wrong."""
    if name not in SCHEDULES:
        close = difflib.get_close_matches(name, [*SCHEDULES, "adafactor"], n=2, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError([f"--lr_scheduler {name}: unknown schedule{hint} (available: "
                           f"{', '.join([*SCHEDULES, 'adafactor'])}; or --lr_scheduler_type for a class)"])
    accepted = options_of(name)
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ConfigError([f"--lr_scheduler_args {', '.join(unknown)}: not an option of --lr_scheduler {name} "
                           f"(accepted: {', '.join(accepted) or 'none'})"])
    return SCHEDULES[name](steps, **options)


class ReportingScheduler:
    """A schedule that changes nothing and reports the optimizer's LRs: used for schedule-free optimizers.

    It is not an `LRScheduler` on purpose: accelerate then leaves it unwrapped (as sd-scripts' dummy scheduler).
    """

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: the optimizer handles its own step size."""

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stateless: nothing to restore."""


def _custom_scheduler(type_name: str, optimizer: Optimizer, kwargs: dict[str, Any]) -> Any:
    """`--lr_scheduler_type`: torch.optim.lr_scheduler.<X> for a bare name, else an importable module.Class."""
    what = f"--lr_scheduler_type {type_name}"
    if "." in type_name:
        module_name, cls_name = type_name.rsplit(".", 1)
        module = import_module(module_name, what)
    else:
        module, cls_name = torch.optim.lr_scheduler, type_name
    cls = class_from(module, cls_name, what)
    try:
        return cls(optimizer, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"{what} with --lr_scheduler_args {kwargs}: rejected ({exc})"]) from exc


def _flag_options(cfg: Any, name: str) -> dict[str, Any]:
    """The options sd-scripts fills from its own flags (num_cycles is halved for the half-wave schedules)."""
    cycles = cfg.lr_scheduler_num_cycles
    if name == "cosine_with_restarts":
        return {"num_cycles": cycles}
    if name == "polynomial":
        return {"power": cfg.lr_scheduler_power}
    if name == "inverse_sqrt":
        return {"timescale": cfg.lr_scheduler_timescale}
    if name == "cosine_with_min_lr":
        return {"num_cycles": cycles / 2, "min_lr_rate": cfg.lr_scheduler_min_lr_ratio}
    if name == "warmup_stable_decay":
        ratio = cfg.lr_scheduler_min_lr_ratio
        return {"num_cycles": cycles / 2, "min_lr_ratio": 0.0 if ratio is None else ratio}
    return {}


def _no_warmup(what: str, warmup: int) -> None:
    if warmup:
        raise ConfigError([f"{what} has no warm-up; remove --lr_warmup_steps (got {warmup} steps)"])


def build_lr_scheduler(
    cfg: Any, optimizer: OptimizerHandle | Optimizer, total_steps: int, num_processes: int = 1
) -> Any:
    """The LR scheduler for a run of `total_steps` optimizer steps (sd-scripts' `get_scheduler_fix`).

    `num_processes` multiplies the step counts as in sd-scripts, where accelerate steps a prepared scheduler
    once per process; pass it only when the scheduler goes through `accelerator.prepare`. Warm-up and decay
    steps are resolved against the multiplied total (ratios and "N%" included).
    """
    handle = optimizer if isinstance(optimizer, OptimizerHandle) else None
    opt = handle.optimizer if handle else optimizer
    total = total_steps * num_processes
    warmup = cfg.resolve_warmup_steps(total)
    kwargs = dict(cfg.lr_scheduler_kwargs()) if hasattr(cfg, "lr_scheduler_kwargs") else {}
    schedule_free = handle.schedule_free if handle else is_schedule_free(cfg.optimizer_type or "")
    if schedule_free:
        if warmup or cfg.lr_scheduler not in ("constant", "constant_with_warmup") or cfg.lr_scheduler_type:
            log.warning(
                "schedule-free optimizers need no LR schedule: --lr_scheduler/--lr_warmup_steps are ignored "
                "(set the optimizer's own warm-up with --optimizer_args warmup_steps=N)")
        return ReportingScheduler(opt)
    if cfg.lr_scheduler_type:
        _no_warmup(f"--lr_scheduler_type {cfg.lr_scheduler_type}", warmup)
        return _custom_scheduler(cfg.lr_scheduler_type, opt, kwargs)
    adafactor_lr = handle.adafactor_initial_lr if handle else None
    if cfg.lr_scheduler == "adafactor" or adafactor_lr is not None:
        return _adafactor_schedule(opt, adafactor_lr, warmup)
    if cfg.lr_scheduler == "reduce_lr_on_plateau":
        _no_warmup("--lr_scheduler reduce_lr_on_plateau", warmup)
        return PlateauSchedule(opt, kwargs)
    return _builtin_schedule(cfg, opt, total, warmup, kwargs)


class PlateauSchedule:
    """--lr_scheduler reduce_lr_on_plateau: torch's `ReduceLROnPlateau`, told each validation loss.

    The loop steps a schedule after every optimizer step; this one changes nothing then and lowers the LRs when
    the validation loss (`--validation_split`) stops improving, counting `patience` in validations. Its options
    (`mode`, `factor`, `patience`, `threshold`, `threshold_mode`, `cooldown`, `min_lr`, `eps`) come from
    `--lr_scheduler_args`. Not an `LRScheduler`, so accelerate leaves it unwrapped.
    """

    def __init__(self, optimizer: Optimizer, options: dict[str, Any]):
        from torch.optim.lr_scheduler import ReduceLROnPlateau

        self.optimizer = optimizer
        try:
            self.plateau = ReduceLROnPlateau(optimizer, **options)
        except (TypeError, ValueError) as exc:
            accepted = [p for p in inspect.signature(ReduceLROnPlateau).parameters if p not in ("self", "optimizer")]
            raise ConfigError([f"--lr_scheduler reduce_lr_on_plateau with --lr_scheduler_args {options}: rejected "
                               f"({exc}; accepted: {', '.join(accepted)})"]) from exc

    def step(self, *args: Any, **kwargs: Any) -> None:
        """An optimizer step: nothing changes until a validation loss comes."""

    def report_validation_loss(self, loss: float) -> None:
        self.plateau.step(loss)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return self.plateau.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau.load_state_dict(state)


def _builtin_schedule(cfg: Any, opt: Optimizer, total: int, warmup: int, kwargs: dict[str, Any]) -> LambdaLR:
    """A named schedule as a LambdaLR; `--lr_scheduler_args` override the options filled from the flags."""
    if cfg.lr_scheduler in NO_WARMUP:
        _no_warmup(f"--lr_scheduler {cfg.lr_scheduler}", warmup)
    steps = ScheduleSteps(warmup=warmup, total=total, decay=cfg.resolve_decay_steps(total),
                          base_lr=float(opt.defaults.get("lr") or 1.0))
    last_epoch = kwargs.pop("last_epoch", -1)
    options = {**_flag_options(cfg, cfg.lr_scheduler), **kwargs}
    return LambdaLR(opt, schedule_factor(cfg.lr_scheduler, steps, **options), last_epoch=last_epoch)


def _adafactor_schedule(optimizer: Optimizer, initial_lr: float | None, warmup: int) -> Any:
    """transformers' proxy schedule, which reports the step size Adafactor computes for itself."""
    from transformers.optimization import Adafactor, AdafactorSchedule

    if not isinstance(optimizer, Adafactor) or initial_lr is None:
        raise ConfigError(["--lr_scheduler adafactor needs --optimizer_type Adafactor with relative_step=True "
                           "(its default)"])
    _no_warmup("--lr_scheduler adafactor", warmup)
    return AdafactorSchedule(optimizer, initial_lr)

