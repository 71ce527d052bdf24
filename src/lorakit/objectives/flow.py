"""Rectified-flow (flow-matching) objective for FLUX.1 and SD3: timestep sampling, shift, weighting schemes.

The forward process is the straight path between data and noise (Liu et al. 2022, "Flow Straight and Fast",
arXiv:2209.03003; Lipman et al. 2022, "Flow Matching for Generative Modeling", arXiv:2210.02747):

    x_σ = (1 − σ) x₀ + σ ε,        target (velocity) v = ε − x₀,        σ ∈ [0, 1].

How σ is drawn follows sd-scripts' `--timestep_sampling` modes; the densities and loss weights follow
Esser et al. 2024 ("Scaling Rectified Flow Transformers", arXiv:2403.03206, §3.1): logit-normal and mode
sampling, and the `sigma_sqrt`/`cosmap` weightings. The resolution-dependent shift of `flux_shift` is the one
FLUX.1 samples with (μ linear in the image token count, σ' = e^μ / (e^μ + 1/σ − 1)).

Everything here is a pure function of tensors and options; `FlowObjective` wires them into the interface the
training loop calls (`noise`, `elementwise_loss`, `loss_weights`). Nothing here knows which model it trains.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch

from lorakit.objectives.ddpm import NoisedBatch
from lorakit.objectives.losses import LossOptions, elementwise_loss, huber_threshold

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
# FLUX.1's resolution shift: μ is the line through (256 tokens, 0.5) and (4096 tokens, 1.15).
RESOLUTION_SHIFT_POINTS = ((256.0, 0.5), (4096.0, 1.15))


# ---------------------------------------------------------------------------------------------------------
# σ grids and shifts
# ---------------------------------------------------------------------------------------------------------


# DDPM-schedule options a flow objective has no use for; sd-scripts' flow trainers ignore them too (their noise
# comes from the flow's own sampling, and their loss post-processing returns the loss unchanged)
DDPM_ONLY_OPTIONS = (
    "noise_offset", "adaptive_noise_scale", "multires_noise_iterations", "min_snr_gamma",
    "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "debiased_estimation_loss", "zero_terminal_snr",
)


def ignored_option_warnings(cfg: Any, family_name: str) -> list[str]:
    """One warning per DDPM-only option given to a flow-matching family: accepted, as sd-scripts does, but said."""
    return [f"--{name} has no effect on --family {family_name} (flow matching; sd-scripts ignores it there too)"
            for name in DDPM_ONLY_OPTIONS if getattr(cfg, name, None)]


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = s·σ / (1 + (s − 1)·σ): moves mass toward high noise for s > 1 (Esser et al. 2024, eq. 23)."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def scheduler_sigmas(shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The training grid of diffusers' FlowMatchEulerDiscreteScheduler(shift): σ_i = shift(s_i), s_i = (N − i)/N.

    Index 0 is the noisiest (σ = 1); the grid has N entries and never reaches σ = 0.
    """
    steps = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float64) / num_train_timesteps
    return shift_sigmas(steps, shift).float()


@functools.lru_cache(maxsize=8)
def _sigma_grid(shift: float, device: torch.device) -> torch.Tensor:
    """`scheduler_sigmas(shift)` on `device`, built once: rebuilding and copying it to a GPU every step would make
    the CPU wait for the GPU each time."""
    return scheduler_sigmas(shift).to(device)


def resolution_shift_mu(image_seq_len: int) -> float:
    """μ for `flux_shift`: linear in the number of image tokens through RESOLUTION_SHIFT_POINTS."""
    (x1, y1), (x2, y2) = RESOLUTION_SHIFT_POINTS
    slope = (y2 - y1) / (x2 - x1)
    return slope * image_seq_len + (y1 - slope * x1)


def time_shift(mu: float, exponent: float, sigmas: torch.Tensor) -> torch.Tensor:
    """σ' = e^μ / (e^μ + (1/σ − 1)^exponent), the exponential shift FLUX.1 samples with."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0) ** exponent)


# ---------------------------------------------------------------------------------------------------------
# Densities and weights (Esser et al. 2024, §3.1)
# ---------------------------------------------------------------------------------------------------------


def density_samples(
    scheme: str,
    batch_size: int,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """u ∈ (0, 1) per sample from the weighting scheme's density.

    `logit_normal`: u = sigmoid(N(m, s)); `mode`: u = 1 − v − c·(cos²(πv/2) − 1 + v), v ~ U(0, 1);
    anything else: u ~ U(0, 1) (the other schemes only change the loss weight, not the sampling).
    """
    if scheme == "logit_normal":
        normal = torch.randn(batch_size, device=device, generator=generator) * logit_std + logit_mean
        return torch.sigmoid(normal)
    uniform = torch.rand(batch_size, device=device, generator=generator)
    if scheme == "mode":
        return 1.0 - uniform - mode_scale * (torch.cos(math.pi * uniform / 2.0) ** 2 - 1.0 + uniform)
    return uniform


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight for σ: `sigma_sqrt` σ⁻², `cosmap` 2 / (π(1 − 2σ + 2σ²)), otherwise 1."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas.float() + 2.0 * sigmas.float() ** 2))
    return torch.ones_like(sigmas, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Options and σ sampling
# ---------------------------------------------------------------------------------------------------------


def option_or_default(cfg: Any, name: str, default: Any) -> Any:
    """`cfg.name`, or `default` when it is missing or None (an option left unset on the command line)."""
    value = getattr(cfg, name, None)
    return default if value is None else value


@dataclass(frozen=True)
class FlowOptions:
    """sd-scripts' flow options (`--timestep_sampling` … `--model_prediction_type`), defaults as there."""

    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    model_prediction_type: str = "sigma_scaled"
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False

    @classmethod
    def from_options(cls, cfg: Any) -> "FlowOptions":
        get = partial(option_or_default, cfg)
        return cls(
            timestep_sampling=get("timestep_sampling", "sigma"),
            sigmoid_scale=float(get("sigmoid_scale", 1.0)),
            discrete_flow_shift=float(get("discrete_flow_shift", 3.0)),
            weighting_scheme=get("weighting_scheme", "uniform"),
            logit_mean=float(get("logit_mean", 0.0)),
            logit_std=float(get("logit_std", 1.0)),
            mode_scale=float(get("mode_scale", 1.29)),
            model_prediction_type=get("model_prediction_type", "sigma_scaled"),
            ip_noise_gamma=getattr(cfg, "ip_noise_gamma", None) or None,
            ip_noise_gamma_random_strength=bool(getattr(cfg, "ip_noise_gamma_random_strength", False)),
        )

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING),
            ("weighting_scheme", self.weighting_scheme, WEIGHTING_SCHEMES),
            ("model_prediction_type", self.model_prediction_type, MODEL_PREDICTION_TYPES),
        ):
            if value not in allowed:
                raise ValueError(f"--{name} {value!r}: expected one of {', '.join(allowed)}")


def sample_sigmas(
    options: FlowOptions,
    batch_size: int,
    image_seq_len: int,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """σ per sample for `--timestep_sampling` (float32, shape (B,)).

    `image_seq_len` is the number of image tokens (used by `flux_shift` only). In `sigma` mode u comes from the
    weighting scheme's density and indexes the shifted scheduler grid, so `--discrete_flow_shift` applies there
    too, as it does in sd-scripts.
    """
    mode = options.timestep_sampling
    if mode == "uniform":
        return torch.rand(batch_size, device=device, generator=generator)
    if mode in ("sigmoid", "shift", "flux_shift"):
        normal = torch.randn(batch_size, device=device, generator=generator)
        sigmas = torch.sigmoid(options.sigmoid_scale * normal)
        if mode == "shift":
            return shift_sigmas(sigmas, options.discrete_flow_shift)
        if mode == "flux_shift":
            return time_shift(resolution_shift_mu(image_seq_len), 1.0, sigmas)
        return sigmas
    u = density_samples(
        options.weighting_scheme, batch_size, logit_mean=options.logit_mean, logit_std=options.logit_std,
        mode_scale=options.mode_scale, device=device, generator=generator,
    )
    grid = _sigma_grid(options.discrete_flow_shift, torch.device(device))
    # u from `mode` can leave [0, 1) slightly for large scales; the grid index must stay inside it
    indices = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    return grid[indices]


# ---------------------------------------------------------------------------------------------------------
# Noising, target and prediction
# ---------------------------------------------------------------------------------------------------------


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=like.dtype).view((-1,) + (1,) * (like.ndim - 1))


def add_flow_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ) x₀ + σ ε."""
    sigma = _per_sample(sigmas, latents)
    return (1.0 - sigma) * latents + sigma * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity dx_σ/dσ = ε − x₀ the denoiser learns."""
    return noise - latents


def apply_model_prediction_type(
    prediction: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """sd-scripts' `--model_prediction_type`: `raw` keeps the output, `additive` adds x_σ, `sigma_scaled`
    gives −σ·out + x_σ (an x₀-style estimate if out is the velocity). The target stays ε − x₀ in all three."""
    if prediction_type == "raw":
        return prediction
    if prediction_type == "additive":
        return prediction + noisy
    if prediction_type == "sigma_scaled":
        return prediction * (-_per_sample(sigmas, prediction)) + noisy
    raise ValueError(f"unknown model_prediction_type {prediction_type!r}; expected one of {MODEL_PREDICTION_TYPES}")


def timesteps_to_sigmas(timesteps: torch.Tensor) -> torch.Tensor:
    """The training timesteps are σ·1000 (as sd-scripts logs and passes them); this undoes that."""
    return timesteps.float() / NUM_TRAIN_TIMESTEPS


def _ip_noise_strength(options: FlowOptions, device: torch.device, generator: torch.Generator | None) -> float | torch.Tensor:
    if options.ip_noise_gamma_random_strength:
        return torch.rand((), device=device, generator=generator) * options.ip_noise_gamma
    return options.ip_noise_gamma


@dataclass(frozen=True)
class FlowObjective:
    """One flow-matching training step: σ sampling, noising, velocity target, loss and per-sample weights.

    `patch_size` is the side of the latent patches the denoiser turns into tokens (2 for FLUX.1 and SD3); it
    only matters for `flux_shift`, whose shift depends on the token count.
    """

    options: FlowOptions = field(default_factory=FlowOptions)
    loss_options: LossOptions = field(default_factory=LossOptions)
    patch_size: int = 2
    fixed_timestep: float | None = None  # every sample at this timestep (σ·1000): the validation loss

    @classmethod
    def from_options(cls, cfg: Any, patch_size: int = 2) -> "FlowObjective":
        return cls(FlowOptions.from_options(cfg), LossOptions.from_options(cfg), patch_size)

    def noise(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> NoisedBatch:
        """Noisy latents, timesteps (σ·1000) and the velocity target; --ip_noise_gamma perturbs the input only."""
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=generator)
        height, width = latents.shape[-2:]
        seq_len = (height // self.patch_size) * (width // self.patch_size)
        sigmas = sample_sigmas(self.options, latents.shape[0], seq_len, device=latents.device, generator=generator)
        if self.fixed_timestep is not None:
            sigmas = torch.full_like(sigmas, self.fixed_timestep / NUM_TRAIN_TIMESTEPS)
        noise_in = noise
        if self.options.ip_noise_gamma:
            extra = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=generator)
            noise_in = noise + _ip_noise_strength(self.options, latents.device, generator) * extra
        noisy = add_flow_noise(latents, noise_in, sigmas)
        return NoisedBatch(noisy, sigmas * NUM_TRAIN_TIMESTEPS, flow_target(latents, noise))

    def at_timestep(self, timestep: int) -> "FlowObjective":
        """The same objective with every sample at `timestep` (σ = t/1000): the validation loss's fixed
        timesteps (sd-scripts' FLUX validation ignores them and samples as in training; fixed ones make the
        figure comparable between validations)."""
        return replace(self, fixed_timestep=float(timestep))

    def prediction(self, output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The denoiser output turned into what the loss compares, per --model_prediction_type."""
        return apply_model_prediction_type(output, noisy, timesteps_to_sigmas(timesteps), self.options.model_prediction_type)

    def elementwise_loss(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return flow_elementwise_loss(self.loss_options, prediction, target, timesteps)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """The weighting scheme's σ weight, applied (as in sd-scripts) only with `sigma_scaled` predictions."""
        if self.options.model_prediction_type != "sigma_scaled":
            return None
        if self.options.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None
        return loss_weighting(self.options.weighting_scheme, timesteps_to_sigmas(timesteps))


def flow_elementwise_loss(options: Any, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """--loss_type per element for flow models; Huber thresholds from the timesteps (σ·1000).

    The `snr` Huber schedule needs a DDPM schedule; the config rules reject it for flow models.
    """
    threshold = None
    if options.uses_huber:
        threshold = huber_threshold(timesteps, options.huber_schedule, options.huber_c, options.huber_scale, None, NUM_TRAIN_TIMESTEPS)
    return elementwise_loss(prediction, target, options.loss_type, threshold)
