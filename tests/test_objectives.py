"""The DDPM objective against its closed forms and against diffusers' DDPMScheduler."""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler

from lorakit.objectives.ddpm import DDPMObjective, DDPMSchedule, add_noise, sample_timesteps, training_target


def test_schedule_matches_diffusers_scaled_linear():
    ours = DDPMSchedule.scaled_linear()
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.allclose(ours.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6)


def test_noise_and_velocity_match_diffusers():
    schedule = DDPMSchedule.scaled_linear(prediction_type="v_prediction")
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(add_noise(schedule, x0, eps, t), ref.add_noise(x0, eps, t), atol=1e-5)
    assert torch.allclose(training_target(schedule, x0, eps, t), ref.get_velocity(x0, eps, t), atol=1e-5)


def test_epsilon_target_is_the_noise():
    schedule = DDPMSchedule.scaled_linear()
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    assert torch.equal(training_target(schedule, x0, eps, torch.tensor([3, 700])), eps)


def test_zero_terminal_snr_keeps_first_and_zeroes_last():
    plain = DDPMSchedule.scaled_linear()
    rescaled = DDPMSchedule.scaled_linear(zero_terminal_snr=True)
    assert math.isclose(rescaled.alphas_cumprod[0].item(), plain.alphas_cumprod[0].item(), rel_tol=1e-9)
    assert rescaled.alphas_cumprod[-1].item() == 0.0
    assert torch.all(rescaled.alphas_cumprod[1:] <= rescaled.alphas_cumprod[:-1])


def test_timesteps_respect_bounds():
    schedule = DDPMSchedule.scaled_linear()
    torch.manual_seed(0)
    t = sample_timesteps(4096, schedule, 100, 200, torch.device("cpu"))
    assert t.min() >= 100 and t.max() < 200 and len(t.unique()) == 100
    assert torch.all(sample_timesteps(3, schedule, 500, 500, torch.device("cpu")) == 500)


def test_objective_noisy_inputs_are_consistent():
    objective = DDPMObjective(DDPMSchedule.scaled_linear(prediction_type="v_prediction"))
    torch.manual_seed(1)
    x0 = torch.randn(3, 4, 8, 8)
    out = objective.noise(x0)
    a = objective.schedule.alphas_cumprod[out.timesteps].float().view(-1, 1, 1, 1)
    # recover the noise from x_t, then check v = sqrt(a) eps - sqrt(1-a) x0
    eps = (out.noisy - a.sqrt() * x0) / (1 - a).sqrt()
    assert torch.allclose(out.target, a.sqrt() * eps - (1 - a).sqrt() * x0, atol=1e-4)
