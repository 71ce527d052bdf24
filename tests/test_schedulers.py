"""Learning-rate schedules against their formulas and against diffusers' implementations."""

from __future__ import annotations

import pytest
import torch
from diffusers.optimization import get_scheduler

from lorakit.errors import ConfigError
from lorakit.training.schedulers import build_lr_scheduler


def _lrs(scheduler, optimizer, steps):
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"])
def test_schedules_match_diffusers(name):
    total, warmup = 50, 7
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ours = build_lr_scheduler(name, ours_opt, warmup_steps=warmup, total_steps=total, num_cycles=1)
    kwargs = {"num_warmup_steps": warmup}
    if name != "constant_with_warmup" and name != "constant":
        kwargs["num_training_steps"] = total
    if name == "constant":
        kwargs = {}
    ref = get_scheduler(name, ref_opt, **kwargs)
    assert _lrs(ours, ours_opt, total) == pytest.approx(_lrs(ref, ref_opt, total), abs=1e-12)


def test_unknown_schedule_is_a_config_error():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="lr_scheduler"):
        build_lr_scheduler("banana", opt, warmup_steps=0, total_steps=10)
