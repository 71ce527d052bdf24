"""Learning-rate schedules as multipliers of the base rate, named as in sd-scripts / diffusers.

Each schedule is a pure function of the optimizer step so tests can check it against its formula.
"""

from __future__ import annotations

import math
from typing import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lorakit.errors import ConfigError


def _warmup(step: int, warmup: int) -> float | None:
    return step / max(1, warmup) if step < warmup else None


def constant(warmup: int, total: int, cycles: float) -> Callable[[int], float]:
    return lambda step: 1.0


def constant_with_warmup(warmup: int, total: int, cycles: float) -> Callable[[int], float]:
    return lambda step: w if (w := _warmup(step, warmup)) is not None else 1.0


def linear(warmup: int, total: int, cycles: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if (w := _warmup(step, warmup)) is not None:
            return w
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def cosine(warmup: int, total: int, cycles: float) -> Callable[[int], float]:
    """Half a cosine (cycles=0.5 in diffusers' terms) from 1 to 0 after warm-up."""

    def factor(step: int) -> float:
        if (w := _warmup(step, warmup)) is not None:
            return w
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * 0.5 * progress)))

    return factor


def cosine_with_restarts(warmup: int, total: int, cycles: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if (w := _warmup(step, warmup)) is not None:
            return w
        progress = (step - warmup) / max(1, total - warmup)
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))

    return factor


SCHEDULES = {
    "constant": constant,
    "constant_with_warmup": constant_with_warmup,
    "linear": linear,
    "cosine": cosine,
    "cosine_with_restarts": cosine_with_restarts,
}


def build_lr_scheduler(name: str, optimizer: Optimizer, *, warmup_steps: int, total_steps: int, num_cycles: float = 1) -> LambdaLR:
    if name not in SCHEDULES:
        raise ConfigError([f"--lr_scheduler {name}: not implemented yet (available: {', '.join(SCHEDULES)})"])
    return LambdaLR(optimizer, SCHEDULES[name](warmup_steps, total_steps, num_cycles))
