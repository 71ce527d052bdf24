"""LR schedules against their formulas and against the transformers/diffusers implementations sd-scripts calls."""

from __future__ import annotations

import math

import pytest
import torch
import transformers.optimization as tf
from diffusers.optimization import get_piecewise_constant_schedule

from lorakit.config import TrainConfig
from lorakit.errors import ConfigError
from lorakit.training.optim import build_optimizer
from lorakit.training.schedulers import ReportingScheduler, ScheduleSteps, build_lr_scheduler, schedule_factor

REQUIRED = {"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "data", "resolution": 512,
            "output_dir": "out"}
TOTAL, WARMUP, LR = 50, 7, 1e-3


def make_cfg(**options) -> TrainConfig:
    return TrainConfig(**(REQUIRED | options))


def sgd(lr: float = LR) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def lrs(scheduler, optimizer, steps: int = TOTAL) -> list[float]:
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def ours(steps: int = TOTAL, **options) -> list[float]:
    optimizer = sgd()
    return lrs(build_lr_scheduler(make_cfg(learning_rate=LR, **options), optimizer, TOTAL), optimizer, steps)


def reference(factory, *args, **kwargs) -> list[float]:
    optimizer = sgd()
    return lrs(factory(optimizer, *args, **kwargs), optimizer)


# (our options, the reference call sd-scripts makes for them)
CASES = {
    "constant": ({}, lambda: reference(tf.get_constant_schedule)),
    "constant_with_warmup": ({"lr_warmup_steps": WARMUP}, lambda: reference(tf.get_constant_schedule_with_warmup, WARMUP)),
    "linear": ({"lr_warmup_steps": WARMUP}, lambda: reference(tf.get_linear_schedule_with_warmup, WARMUP, TOTAL)),
    "cosine": ({"lr_warmup_steps": WARMUP}, lambda: reference(tf.get_cosine_schedule_with_warmup, WARMUP, TOTAL)),
    "cosine_with_restarts": (
        {"lr_warmup_steps": WARMUP, "lr_scheduler_num_cycles": 3},
        lambda: reference(tf.get_cosine_with_hard_restarts_schedule_with_warmup, WARMUP, TOTAL, num_cycles=3),
    ),
    "polynomial": (
        {"lr_warmup_steps": WARMUP, "lr_scheduler_power": 2.0},
        lambda: reference(tf.get_polynomial_decay_schedule_with_warmup, WARMUP, TOTAL, power=2.0),
    ),
    "inverse_sqrt": (
        {"lr_warmup_steps": WARMUP, "lr_scheduler_timescale": 20},
        lambda: reference(tf.get_inverse_sqrt_schedule, WARMUP, timescale=20),
    ),
    "cosine_with_min_lr": (
        {"lr_warmup_steps": WARMUP, "lr_scheduler_min_lr_ratio": 0.1, "lr_scheduler_num_cycles": 1},
        lambda: reference(tf.get_cosine_with_min_lr_schedule_with_warmup, WARMUP, TOTAL, num_cycles=0.5, min_lr_rate=0.1),
    ),
    "warmup_stable_decay": (
        {"lr_warmup_steps": WARMUP, "lr_decay_steps": "20%", "lr_scheduler_min_lr_ratio": 0.05},
        lambda: reference(tf.get_wsd_schedule, WARMUP, 10, num_stable_steps=TOTAL - WARMUP - 10, min_lr_ratio=0.05),
    ),
    "piecewise_constant": (
        {"lr_scheduler_args": ["step_rules='1:10,0.5:20,0.25:30,0.1'"]},
        lambda: reference(get_piecewise_constant_schedule, step_rules="1:10,0.5:20,0.25:30,0.1"),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_matches_the_reference_implementation(name):
    options, expected = CASES[name]
    assert ours(lr_scheduler=name, **options) == pytest.approx(expected(), rel=1e-12, abs=1e-15)


def test_linear_and_cosine_against_their_formulas():
    """Written out independently: warm-up w/W, then (T−t)/(T−W) and ½(1 + cos(π·(t−W)/(T−W)))."""
    steps = ScheduleSteps(warmup=WARMUP, total=TOTAL)
    lin, cos = schedule_factor("linear", steps), schedule_factor("cosine", steps)
    for t in range(TOTAL + 1):
        if t < WARMUP:
            assert lin(t) == cos(t) == pytest.approx(t / WARMUP)
            continue
        assert lin(t) == pytest.approx((TOTAL - t) / (TOTAL - WARMUP))
        assert cos(t) == pytest.approx(0.5 * (1 + math.cos(math.pi * (t - WARMUP) / (TOTAL - WARMUP))))


def test_warmup_stable_decay_phases_by_formula():
    factor = schedule_factor("warmup_stable_decay", ScheduleSteps(warmup=5, total=50, decay=10), min_lr_ratio=0.2,
                             decay_type="linear")
    assert factor(0) == pytest.approx(0.2)  # warm-up starts at the floor
    assert factor(5) == factor(39) == 1.0  # stable until warm-up + stable = 40
    assert factor(45) == pytest.approx((1 - 0.5) * 0.8 + 0.2)
    assert factor(60) == pytest.approx(0.2)


def test_warmup_ratio_and_percent_resolve_against_total_times_processes():
    # 10% of 50 steps x 2 processes = 10 warm-up steps over a 100-step schedule.
    optimizer = sgd()
    cfg = make_cfg(learning_rate=LR, lr_scheduler="linear", lr_warmup_steps="10%")
    values = lrs(build_lr_scheduler(cfg, optimizer, TOTAL, num_processes=2), optimizer, 100)
    assert values == pytest.approx(reference_linear(10, 100))
    optimizer = sgd()
    cfg = make_cfg(learning_rate=LR, lr_scheduler="linear", lr_warmup_steps=0.1)
    assert lrs(build_lr_scheduler(cfg, optimizer, TOTAL), optimizer) == pytest.approx(reference_linear(5, 50))


def reference_linear(warmup: int, total: int) -> list[float]:
    optimizer = sgd()
    return lrs(tf.get_linear_schedule_with_warmup(optimizer, warmup, total), optimizer, total)


def test_scheduler_args_reach_the_builtin_schedule():
    values = ours(lr_scheduler="cosine", lr_warmup_steps=WARMUP, lr_scheduler_args=["num_cycles=1.0"])
    assert values == pytest.approx(reference(tf.get_cosine_schedule_with_warmup, WARMUP, TOTAL, num_cycles=1.0))


def test_unknown_scheduler_arg_lists_the_accepted_ones():
    with pytest.raises(ConfigError, match="accepted: power, lr_end"):
        ours(lr_scheduler="polynomial", lr_scheduler_args=["powr=2"])


def test_unknown_schedule_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean cosine_with_restarts"):
        schedule_factor("cosine_with_restart", ScheduleSteps(warmup=0, total=10))


def test_custom_torch_scheduler_type():
    values = ours(lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=10", "gamma=0.5"])
    assert values == pytest.approx([LR * 0.5 ** (t // 10) for t in range(TOTAL)])
    dotted = ours(lr_scheduler_type="torch.optim.lr_scheduler.ExponentialLR", lr_scheduler_args=["gamma=0.9"])
    assert dotted == pytest.approx([LR * 0.9**t for t in range(TOTAL)])


def test_custom_scheduler_errors_are_config_errors():
    with pytest.raises(ConfigError, match="no module .no_such_schedules. is installed or in the working directory"):
        ours(lr_scheduler_type="no_such_schedules.Fancy")
    with pytest.raises(ConfigError, match="did you mean StepLR"):
        ours(lr_scheduler_type="StepLRR", lr_scheduler_args=["step_size=10"])


def test_constant_and_piecewise_refuse_warmup():
    optimizer = sgd()
    cfg = make_cfg(lr_scheduler="piecewise_constant", lr_warmup_steps=5, lr_scheduler_args=["step_rules='1:10,0.1'"])
    with pytest.raises(ConfigError, match="no warm-up"):
        build_lr_scheduler(cfg, optimizer, TOTAL)


def tiny_groups() -> list[dict]:
    return [{"params": list(torch.nn.Linear(4, 4).parameters()), "lr": LR}]


def test_adafactor_relative_step_gets_the_adafactor_schedule():
    cfg = make_cfg(optimizer_type="Adafactor", learning_rate=LR, lr_scheduler="constant_with_warmup")
    handle = build_optimizer(cfg, tiny_groups())
    scheduler = build_lr_scheduler(cfg, handle, TOTAL)
    assert isinstance(scheduler, tf.AdafactorSchedule)
    assert scheduler.get_last_lr() == [LR]  # before the first step it reports the initial LR


def test_adafactor_schedule_needs_relative_step():
    cfg = make_cfg(optimizer_type="Adafactor", learning_rate=LR, lr_scheduler="adafactor",
                   optimizer_args=["relative_step=False"])
    handle = build_optimizer(cfg, tiny_groups())
    with pytest.raises(ConfigError, match="relative_step"):
        build_lr_scheduler(cfg, handle, TOTAL)


def test_schedule_free_gets_a_reporting_scheduler():
    pytest.importorskip("schedulefree")
    cfg = make_cfg(optimizer_type="AdamWScheduleFree", learning_rate=LR, lr_scheduler="cosine")
    handle = build_optimizer(cfg, tiny_groups())
    scheduler = build_lr_scheduler(cfg, handle, TOTAL)
    assert isinstance(scheduler, ReportingScheduler)
    scheduler.step()
    assert scheduler.get_last_lr() == [LR]
    assert scheduler.state_dict() == {}


def test_reduce_lr_on_plateau_waits_for_validation_losses():
    plateau = dict(lr_scheduler="reduce_lr_on_plateau", lr_scheduler_args=["factor=0.5", "patience=1"])
    assert ours(**plateau) == [LR] * TOTAL  # optimizer steps change nothing
    scheduler = build_lr_scheduler(make_cfg(learning_rate=LR, **plateau), sgd(), TOTAL)
    for loss in (1.0, 1.0, 1.0):  # one bad validation is within patience, the second lowers the LR
        scheduler.report_validation_loss(loss)
    assert scheduler.get_last_lr() == [LR / 2]
    with pytest.raises(ConfigError, match="no warm-up"):
        ours(lr_scheduler="reduce_lr_on_plateau", lr_warmup_steps=3)
    with pytest.raises(ConfigError, match="rejected"):
        ours(lr_scheduler="reduce_lr_on_plateau", lr_scheduler_args=["paitence=1"])
