"""Flow-matching math against hand formulas: σ sampling modes, shifts, weighting schemes, predictions."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from lorakit.objectives.flow import (
    FlowObjective,
    FlowOptions,
    add_flow_noise,
    apply_model_prediction_type,
    density_samples,
    resolution_shift_mu,
    loss_weighting,
    sample_sigmas,
    scheduler_sigmas,
    shift_sigmas,
    time_shift,
)

N = 20000


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_scheduler_grid_matches_diffusers():
    for shift in (1.0, 3.0, 3.1582):
        ours = scheduler_sigmas(shift)
        theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).sigmas
        assert ours.shape == (1000,)
        assert torch.allclose(ours, theirs[:1000].float(), atol=1e-6)


def test_shift_formula():
    s = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(shift_sigmas(s, 3.0), 3 * s / (1 + 2 * s))
    assert torch.equal(shift_sigmas(s, 1.0), s)


def test_resolution_shift_mu_and_time_shift():
    assert resolution_shift_mu(256) == pytest.approx(0.5) and resolution_shift_mu(4096) == pytest.approx(1.15)
    assert resolution_shift_mu(1024) == pytest.approx(0.5 + 0.65 * (1024 - 256) / 3840)
    s = torch.tensor([0.25, 0.5])
    assert torch.allclose(time_shift(0.7, 1.0, s), math.exp(0.7) / (math.exp(0.7) + (1 / s - 1)))


def test_uniform_and_sigmoid_distributions():
    u = sample_sigmas(FlowOptions(timestep_sampling="uniform"), N, 16, generator=gen())
    assert u.shape == (N,) and 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    s = sample_sigmas(FlowOptions(timestep_sampling="sigmoid", sigmoid_scale=2.0), N, 16, generator=gen(1))
    logits = torch.logit(s.double())
    assert abs(logits.mean()) < 0.05 and abs(logits.std() - 2.0) < 0.05  # logit(σ) ~ N(0, scale²)


def test_shift_and_flux_shift_are_the_sigmoid_draws_shifted():
    base = sample_sigmas(FlowOptions(timestep_sampling="sigmoid"), 64, 16, generator=gen(2))
    shifted = sample_sigmas(FlowOptions(timestep_sampling="shift", discrete_flow_shift=3.1582), 64, 16, generator=gen(2))
    assert torch.allclose(shifted, 3.1582 * base / (1 + 2.1582 * base), atol=1e-6)
    flux = sample_sigmas(FlowOptions(timestep_sampling="flux_shift"), 64, 1024, generator=gen(2))
    mu = resolution_shift_mu(1024)
    assert torch.allclose(flux, math.exp(mu) / (math.exp(mu) + 1 / base - 1), atol=1e-6)


def test_sigma_mode_indexes_the_shifted_grid():
    options = FlowOptions(timestep_sampling="sigma", discrete_flow_shift=3.0, weighting_scheme="uniform")
    sigmas = sample_sigmas(options, 64, 16, generator=gen(3))
    u = torch.rand(64, generator=gen(3))
    assert torch.equal(sigmas, scheduler_sigmas(3.0)[(u * 1000).long()])
    logit = sample_sigmas(FlowOptions(weighting_scheme="logit_normal", discrete_flow_shift=1.0), N, 16, generator=gen(4))
    assert abs(logit.mean() - 0.5) < 0.01  # logit-normal(0, 1) is symmetric about 1/2


def test_density_formulas():
    u = density_samples("logit_normal", 8, logit_mean=0.3, logit_std=0.5, generator=gen(5))
    assert torch.allclose(u, torch.sigmoid(torch.randn(8, generator=gen(5)) * 0.5 + 0.3))
    m = density_samples("mode", 8, mode_scale=1.29, generator=gen(6))
    v = torch.rand(8, generator=gen(6))
    assert torch.allclose(m, 1 - v - 1.29 * (torch.cos(math.pi * v / 2) ** 2 - 1 + v))


def test_weighting_schemes():
    s = torch.tensor([0.2, 0.5, 0.8])
    assert torch.allclose(loss_weighting("sigma_sqrt", s), 1 / s**2)
    assert torch.allclose(loss_weighting("cosmap", s), 2 / (math.pi * (1 - 2 * s + 2 * s**2)))
    for scheme in ("none", "uniform", "logit_normal", "mode"):
        assert torch.equal(loss_weighting(scheme, s), torch.ones(3))


def test_noising_target_and_prediction_types():
    x, eps, s = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([0.25, 0.75])
    noisy = add_flow_noise(x, eps, s)
    assert torch.allclose(noisy[1], 0.25 * x[1] + 0.75 * eps[1])
    out = torch.randn_like(x)
    assert torch.equal(apply_model_prediction_type(out, noisy, s, "raw"), out)
    assert torch.allclose(apply_model_prediction_type(out, noisy, s, "additive"), out + noisy)
    assert torch.allclose(apply_model_prediction_type(out, noisy, s, "sigma_scaled")[0], -0.25 * out[0] + noisy[0])
    # the exact velocity ε − x₀ turns, sigma-scaled, into x₀
    assert torch.allclose(apply_model_prediction_type(eps - x, noisy, s, "sigma_scaled"), x, atol=1e-6)


def test_objective_interface():
    cfg = SimpleNamespace(timestep_sampling="uniform", model_prediction_type="sigma_scaled", weighting_scheme="sigma_sqrt",
                          loss_type="huber", huber_schedule="constant", huber_c=0.1, huber_scale=1.0)
    objective = FlowObjective.from_options(cfg)
    latents = torch.randn(3, 16, 4, 4)
    batch = objective.noise(latents, generator=gen(7))
    sigmas = batch.timesteps / 1000
    assert batch.timesteps.shape == (3,) and (0 <= sigmas).all() and (sigmas < 1).all()
    noise = batch.target + latents
    assert torch.allclose(batch.noisy, add_flow_noise(latents, noise, sigmas), atol=1e-5)
    assert torch.allclose(objective.loss_weights(batch.timesteps), sigmas**-2)
    loss = objective.elementwise_loss(batch.target + 0.5, batch.target, batch.timesteps)
    assert torch.allclose(loss, torch.full_like(loss, 2 * 0.1 * (math.sqrt(0.25 + 0.01) - 0.1)))
    raw = FlowObjective.from_options(SimpleNamespace(model_prediction_type="raw", weighting_scheme="sigma_sqrt"))
    assert raw.loss_weights(batch.timesteps) is None  # sd-scripts weights only sigma_scaled predictions


def test_ip_noise_gamma_perturbs_input_not_target():
    objective = FlowObjective(FlowOptions(timestep_sampling="uniform", ip_noise_gamma=0.5))
    latents = torch.randn(2, 16, 4, 4)
    batch = objective.noise(latents, generator=gen(8))
    plain = FlowObjective(FlowOptions(timestep_sampling="uniform")).noise(latents, generator=gen(8))
    assert torch.equal(batch.target, plain.target) and not torch.allclose(batch.noisy, plain.noisy)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="timestep_sampling"):
        FlowOptions(timestep_sampling="cosine")


@pytest.mark.parametrize("family_name", ["sd3", "flux"])
def test_ddpm_only_options_are_accepted_with_a_warning_on_flow_families(family_name, tmp_path):
    """sd-scripts' flow trainers ignore noise offset, multires noise and the SNR weightings; lorakit says so."""
    from lorakit.config import parse_train_args
    from lorakit.families.registry import get_family

    cfg, _ = parse_train_args([f"--pretrained_model_name_or_path={tmp_path}", f"--train_data_dir={tmp_path}",
                               "--resolution=64", f"--output_dir={tmp_path}", "--noise_offset=0.05",
                               "--min_snr_gamma=5", "--multires_noise_iterations=6"], check_support=False)
    warnings = get_family(family_name).option_warnings(cfg)
    for option in ("noise_offset", "min_snr_gamma", "multires_noise_iterations"):
        assert any(w.startswith(f"--{option} has no effect on --family {family_name}") for w in warnings), warnings
    assert len(warnings) == 3
