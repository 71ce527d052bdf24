"""Per-step host-to-device work: copies go through `to_device`, schedule tables are moved once per device."""

from __future__ import annotations

import torch

from lorakit.objectives.ddpm import DDPMSchedule
from lorakit.objectives.flow import _sigma_grid, scheduler_sigmas
from lorakit.transfer import to_device


def test_to_device_on_the_cpu_is_a_plain_to():
    ids = torch.arange(6).view(2, 3)
    assert to_device(ids, "cpu") is ids  # nothing to copy
    weights = to_device(torch.tensor([1.0, 0.5], dtype=torch.float64), torch.device("cpu"), torch.float32)
    assert weights.dtype == torch.float32 and weights.tolist() == [1.0, 0.5]


def test_ddpm_schedule_is_moved_once_per_device():
    schedule = DDPMSchedule.scaled_linear()
    table = schedule.on(torch.device("cpu"))
    assert schedule.on(torch.device("cpu")) is table  # the same tensor every step
    assert torch.equal(table, schedule.alphas_cumprod)
    timesteps = torch.tensor([0, 500, 999])
    expected = schedule.alphas_cumprod[timesteps] / (1 - schedule.alphas_cumprod[timesteps])
    torch.testing.assert_close(schedule.snr(timesteps), expected.float())
    assert schedule == DDPMSchedule(schedule.alphas_cumprod)  # the per-device copies take no part in equality


def test_flow_sigma_grid_is_built_once_per_shift_and_device():
    grid = _sigma_grid(3.1582, torch.device("cpu"))
    assert _sigma_grid(3.1582, torch.device("cpu")) is grid
    assert torch.equal(grid, scheduler_sigmas(3.1582))
    assert not torch.equal(_sigma_grid(1.0, torch.device("cpu")), grid)
