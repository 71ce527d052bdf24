"""sd-scripts' noise and loss options against reference computations written out in each test."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from lorakit.objectives.ddpm import DDPMObjective, DDPMSchedule, sample_timesteps
from lorakit.objectives.losses import (
    LossOptions,
    debiased_weight,
    elementwise_loss,
    huber_threshold,
    min_snr_weight,
    post_process_loss,
    post_process_weights,
)
from lorakit.objectives.noise import NoiseOptions, offset_noise, pyramid_noise, sample_training_noise

T = torch.tensor([0, 1, 10, 250, 500, 999])


def _reference_scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _reference_snr(t: torch.Tensor) -> torch.Tensor:
    return compute_snr(_reference_scheduler(), t).double()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _objective(prediction_type: str = "epsilon", **options) -> DDPMObjective:
    return DDPMObjective.from_options(SimpleNamespace(**options), prediction_type)


# ---------------------------------------------------------------- noise


def test_noise_offset_adds_one_draw_per_sample_and_channel():
    latents = torch.randn(2, 4, 8, 8)
    out = sample_training_noise(latents, NoiseOptions(noise_offset=0.1), _gen(3))
    g = _gen(3)
    base = torch.randn(2, 4, 8, 8, generator=g)
    expected = base + 0.1 * torch.randn(2, 4, 1, 1, generator=g)
    assert torch.allclose(out.target, expected) and out.input is out.target
    # the added part is constant over H and W
    assert torch.allclose((out.target - base).std(dim=(2, 3)), torch.zeros(2, 4), atol=1e-7)


def test_noise_offset_random_strength_scales_by_one_uniform_draw():
    latents = torch.randn(2, 4, 8, 8)
    out = sample_training_noise(latents, NoiseOptions(noise_offset=0.2, noise_offset_random_strength=True), _gen(4))
    g = _gen(4)
    base = torch.randn(2, 4, 8, 8, generator=g)
    strength = torch.rand(1, generator=g).item() * 0.2
    expected = base + strength * torch.randn(2, 4, 1, 1, generator=g)
    assert torch.allclose(out.target, expected, atol=1e-6)


@pytest.mark.parametrize("scale", [0.5, -0.3])
def test_adaptive_noise_scale_per_sample_and_channel_clamped(scale):
    latents = torch.randn(2, 3, 5, 5) + torch.tensor([0.8, -0.2, 0.0]).view(1, 3, 1, 1)
    noise = torch.randn(2, 3, 5, 5)
    out = offset_noise(latents, noise, 0.1, scale, _gen(5))
    n = torch.randn(2, 3, 1, 1, generator=_gen(5))
    for b in range(2):
        for c in range(3):
            mean = latents[b, c].sum().item() / 25
            offset = max(0.0, 0.1 + scale * abs(mean))
            assert torch.allclose(out[b, c], noise[b, c] + offset * n[b, c], atol=1e-6)


def _pyramid_reference(noise, iterations, discount, g):
    """The multi-resolution recipe written with nn.Upsample, drawing r then the coarse noise per level."""
    b, c, h, w = noise.shape
    up = torch.nn.Upsample(size=(h, w), mode="bilinear")
    total = noise.clone()
    for i in range(iterations):
        r = torch.rand(1, generator=g).item() * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        total += up(torch.randn(b, c, hn, wn, generator=g)) * discount**i
        if hn == 1 or wn == 1:
            break
    return total / total.std()


@pytest.mark.parametrize("iterations,discount", [(1, 0.3), (3, 0.3), (10, 0.8)])
def test_pyramid_noise_exact_values_and_unit_std(iterations, discount):
    noise = torch.randn(2, 4, 16, 12)
    before = noise.clone()
    out = pyramid_noise(noise, iterations, discount, _gen(7))
    ref_gen = _gen(7)
    assert torch.allclose(out, _pyramid_reference(noise, iterations, discount, ref_gen), atol=1e-6)
    assert out.shape == noise.shape and torch.equal(noise, before)
    assert math.isclose(out.std().item(), 1.0, rel_tol=1e-5)
    # with 10 levels the loop stops once a side reaches 1: both generators consumed the same draws
    assert torch.equal(torch.rand(1, generator=ref_gen), torch.rand(1, generator=_advance(noise, iterations, discount)))


def _advance(noise, iterations, discount):
    g = _gen(7)
    pyramid_noise(noise, iterations, discount, g)
    return g


def test_pyramid_noise_correlates_neighbouring_pixels():
    noise = torch.randn(8, 4, 64, 64)
    out = pyramid_noise(noise, 6, 0.8, _gen(8))

    def neighbour_correlation(x):
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    assert abs(neighbour_correlation(noise)) < 0.02
    # the low-frequency levels make adjacent values agree; the two full-resolution draws keep it below 1
    assert 0.1 < neighbour_correlation(out) < 0.9


def test_noise_then_pyramid_order_in_sample_training_noise():
    latents = torch.randn(1, 4, 16, 16)
    options = NoiseOptions(noise_offset=0.1, multires_noise_iterations=2, multires_noise_discount=0.4)
    out = sample_training_noise(latents, options, _gen(9))
    g = _gen(9)
    noise = torch.randn(1, 4, 16, 16, generator=g)
    noise = noise + 0.1 * torch.randn(1, 4, 1, 1, generator=g)
    assert torch.allclose(out.target, _pyramid_reference(noise, 2, 0.4, g), atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ip_noise_gamma_perturbs_the_input_but_not_the_target(prediction_type):
    objective = _objective(prediction_type, ip_noise_gamma=0.1)
    latents = torch.randn(3, 4, 8, 8)
    out = objective.noise(latents, _gen(11))
    g = _gen(11)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    xi = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    ref = _reference_scheduler()
    assert torch.equal(out.timesteps, t)
    assert torch.allclose(out.noisy, ref.add_noise(latents, noise + 0.1 * xi, t), atol=1e-5)
    target = noise if prediction_type == "epsilon" else ref.get_velocity(latents, noise, t)
    assert torch.allclose(out.target, target, atol=1e-5)


def test_ip_noise_gamma_random_strength():
    latents = torch.randn(2, 4, 4, 4)
    options = NoiseOptions(ip_noise_gamma=0.3, ip_noise_gamma_random_strength=True)
    out = sample_training_noise(latents, options, _gen(12))
    g = _gen(12)
    noise = torch.randn(2, 4, 4, 4, generator=g)
    gamma = torch.rand(1, generator=g).item() * 0.3
    assert torch.equal(out.target, noise)
    assert torch.allclose(out.input, noise + gamma * torch.randn(2, 4, 4, 4, generator=g), atol=1e-6)


def test_timestep_bounds_from_options_and_capped_full_value():
    objective = _objective(min_timestep=200, max_timestep=300)
    torch.manual_seed(0)
    t = objective.noise(torch.zeros(512, 1, 2, 2)).timesteps
    assert t.min() >= 200 and t.max() < 300
    schedule = DDPMSchedule.scaled_linear()
    assert torch.all(sample_timesteps(2, schedule, 1000, 1000, torch.device("cpu")) == 999)


# ---------------------------------------------------------------- SNR weights


@pytest.mark.parametrize("v_prediction", [False, True])
def test_min_snr_gamma_both_forms(v_prediction):
    objective = _objective("v_prediction" if v_prediction else "epsilon", min_snr_gamma=5.0)
    snr = _reference_snr(T)
    expected = [min(s, 5.0) / (s + 1 if v_prediction else s) for s in snr.tolist()]
    assert torch.allclose(objective.loss_weights(T).double(), torch.tensor(expected, dtype=torch.float64), rtol=3e-4)
    assert torch.allclose(min_snr_weight(snr, 5.0, v_prediction), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("v_prediction", [False, True])
def test_debiased_estimation_both_forms_with_snr_cap(v_prediction):
    objective = _objective("v_prediction" if v_prediction else "epsilon", debiased_estimation_loss=True)
    snr = _reference_snr(T)
    assert snr[0] > 1000  # t = 0 is the one timestep the cap changes
    capped = [min(s, 1000.0) for s in snr.tolist()]
    expected = [1 / (s + 1) if v_prediction else 1 / math.sqrt(s) for s in capped]
    assert torch.allclose(objective.loss_weights(T).double(), torch.tensor(expected, dtype=torch.float64), rtol=3e-4)
    assert torch.allclose(debiased_weight(snr, v_prediction), torch.tensor(expected, dtype=torch.float64))


def test_scale_v_pred_loss_like_noise_pred():
    objective = _objective("v_prediction", scale_v_pred_loss_like_noise_pred=True)
    capped = [min(s, 1000.0) for s in _reference_snr(T).tolist()]
    expected = torch.tensor([s / (s + 1) for s in capped], dtype=torch.float64)
    assert torch.allclose(objective.loss_weights(T).double(), expected, rtol=3e-4)


def test_scale_v_pred_turns_v_error_into_eps_error():
    """For a fixed x0 error, the v loss times SNR/(SNR+1) equals the eps loss (why the option exists)."""
    schedule = DDPMSchedule.scaled_linear()
    t = torch.tensor([10, 400, 900])
    a = schedule.alphas_cumprod[t].view(-1, 1)
    x0_error = torch.randn(3, 16, dtype=torch.float64)
    eps_error = -x0_error * a.sqrt() / (1 - a).sqrt()  # eps = (x_t - sqrt(a) x0) / sqrt(1-a)
    v_error = a.sqrt() * eps_error - (1 - a).sqrt() * x0_error
    scale = post_process_weights(schedule.snr(t).double(), LossOptions(scale_v_pred_loss_like_noise_pred=True), True)
    v_loss, eps_loss = (v_error**2).mean(1), (eps_error**2).mean(1)
    assert torch.allclose(v_loss * scale.double(), eps_loss, rtol=1e-5)


def test_v_pred_like_loss():
    objective = _objective("epsilon", v_pred_like_loss=0.2)
    capped = [min(s, 1000.0) for s in _reference_snr(T).tolist()]
    loss = 0.7
    expected = [(loss + 0.2 * loss * (s + 1) / s) / loss for s in capped]
    assert torch.allclose(objective.loss_weights(T).double(), torch.tensor(expected, dtype=torch.float64), rtol=3e-4)


def test_post_process_order_matters_for_v_pred_like():
    """v_pred_like's added term is built from the loss already weighted by min-SNR, not from the raw loss."""
    options = LossOptions(min_snr_gamma=1.0, v_pred_like_loss=0.5, debiased_estimation_loss=True)
    t = torch.tensor([5, 100, 700])
    snr = _reference_snr(t)
    raw = torch.tensor([0.3, 0.2, 0.9], dtype=torch.float64)
    capped = snr.clamp(max=1000)
    after_min_snr = raw * snr.clamp(max=1.0) / snr
    in_order = (after_min_snr + 0.5 * after_min_snr * (capped + 1) / capped) / capped.sqrt()
    raw_term = (after_min_snr + 0.5 * raw * (capped + 1) / capped) / capped.sqrt()
    result = post_process_loss(raw, snr, options, v_prediction=False)
    assert torch.allclose(result, in_order)
    assert not torch.allclose(result, raw_term, rtol=1e-2)
    weights = post_process_weights(snr, options, v_prediction=False).double()
    assert torch.allclose(raw * weights, in_order, rtol=1e-6)


def test_all_v_weights_chain_equals_product():
    options = LossOptions(min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=True, debiased_estimation_loss=True)
    snr = _reference_snr(T)
    capped = snr.clamp(max=1000)
    expected = snr.clamp(max=5.0) / (snr + 1) * capped / (capped + 1) / (capped + 1)
    assert torch.allclose(post_process_weights(snr, options, v_prediction=True).double(), expected, rtol=1e-6)


def test_zero_terminal_snr_weights_read_the_original_schedule():
    options = dict(min_snr_gamma=5.0, debiased_estimation_loss=True, v_pred_like_loss=0.1)
    rescaled = _objective("epsilon", zero_terminal_snr=True, **options)
    plain = _objective("epsilon", **options)
    assert rescaled.schedule.alphas_cumprod[-1] == 0  # the noising uses the rescaled schedule
    weights = rescaled.loss_weights(T)
    assert torch.isfinite(weights).all() and torch.equal(weights, plain.loss_weights(T))


def test_no_options_means_mse_and_no_weights():
    objective = _objective("epsilon")
    pred, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert objective.loss_weights(T) is None
    assert torch.equal(objective.elementwise_loss(pred, target, torch.tensor([3, 4])), (pred - target) ** 2)
    falsy = _objective("epsilon", min_snr_gamma=0, v_pred_like_loss=0.0, noise_offset=0.0, ip_noise_gamma=0)
    assert falsy.loss_weights(T) is None and falsy.noise_options == NoiseOptions()


# ---------------------------------------------------------------- loss types and Huber thresholds


def test_loss_type_element_values():
    pred = torch.tensor([[0.3, -1.0, 2.0]])
    target = torch.tensor([[0.0, 0.0, 0.0]])
    c = torch.tensor([0.1])
    assert torch.allclose(elementwise_loss(pred, target, "l2"), torch.tensor([[0.09, 1.0, 4.0]]))
    assert torch.allclose(elementwise_loss(pred, target, "l1"), torch.tensor([[0.3, 1.0, 2.0]]))
    root = [math.sqrt(d * d + 0.01) - 0.1 for d in (0.3, -1.0, 2.0)]
    assert torch.allclose(elementwise_loss(pred, target, "huber", c), torch.tensor([[0.2 * r for r in root]]))
    assert torch.allclose(elementwise_loss(pred, target, "smooth_l1", c), torch.tensor([[2 * r for r in root]]))
    with pytest.raises(ValueError):
        elementwise_loss(pred, target, "l3")


def test_huber_threshold_is_per_sample():
    pred, target = torch.full((2, 1, 2, 2), 0.5), torch.zeros(2, 1, 2, 2)
    loss = elementwise_loss(pred, target, "huber", torch.tensor([0.1, 1.0]))
    assert torch.allclose(loss[0], torch.full((1, 2, 2), 2 * 0.1 * (math.sqrt(0.26) - 0.1)))
    assert torch.allclose(loss[1], torch.full((1, 2, 2), 2 * 1.0 * (math.sqrt(1.25) - 1.0)))


def test_huber_thresholds_at_0_500_999():
    t = torch.tensor([0, 500, 999])
    c, scale = 0.1, 2.0
    constant = huber_threshold(t, "constant", c, scale)
    assert torch.allclose(constant, torch.full((3,), 0.2))
    exponential = huber_threshold(t, "exponential", c, scale)
    assert torch.allclose(exponential, torch.tensor([2.0, 2.0 * c**0.5, 2.0 * c**0.999]))
    alphas = _reference_scheduler().alphas_cumprod
    expected = []
    for step in (0, 500, 999):
        sigma = math.sqrt((1 - alphas[step].item()) / alphas[step].item())
        expected.append((1 - c) / (1 + sigma) ** 2 + c)  # huber_scale is not applied
    snr = huber_threshold(t, "snr", c, scale, DDPMSchedule.scaled_linear().alphas_cumprod)
    assert torch.allclose(snr, torch.tensor(expected), rtol=1e-5)
    assert snr[0] > 0.9 and snr[2] < 0.15
    with pytest.raises(NotImplementedError):
        huber_threshold(t, "snr", c, scale)


def test_huber_snr_threshold_with_zero_terminal_snr_reaches_huber_c():
    schedule = DDPMSchedule.scaled_linear(zero_terminal_snr=True)
    threshold = huber_threshold(torch.tensor([999]), "snr", 0.1, 1.0, schedule.alphas_cumprod)
    assert math.isclose(threshold.item(), 0.1, rel_tol=1e-6)


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
def test_objective_wires_scheduled_huber(loss_type):
    objective = _objective("epsilon", loss_type=loss_type, huber_schedule="exponential", huber_c=0.1, huber_scale=1.0)
    pred, target = torch.full((2, 1, 2, 2), 0.5), torch.zeros(2, 1, 2, 2)
    loss = objective.elementwise_loss(pred, target, torch.tensor([0, 1000]))
    for i, c in enumerate((1.0, 0.1)):
        root = math.sqrt(0.25 + c * c) - c
        value = 2 * c * root if loss_type == "huber" else 2 * root
        assert torch.allclose(loss[i], torch.full((1, 2, 2), value))
