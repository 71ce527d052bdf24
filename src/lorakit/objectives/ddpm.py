"""Discrete-time DDPM objective for SD 1.x/2.x and SDXL (epsilon and v prediction).

Pure functions over a `DDPMSchedule`, so tests can check them against the closed forms:
- forward process (Ho et al. 2020, arXiv:2006.11239): x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, a_t = prod(1 - beta)
- v prediction (Salimans & Ho 2022, arXiv:2202.00512): v = sqrt(a_t) eps - sqrt(1 - a_t) x_0
- zero terminal SNR rescale (Lin et al. 2023, arXiv:2305.08891)
The noise options live in `noise.py`, the loss types and SNR weights in `losses.py`; `DDPMObjective` wires them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lorakit.objectives.losses import LossOptions, elementwise_loss, huber_threshold, post_process_weights
from lorakit.objectives.noise import NoiseOptions, sample_training_noise


@dataclass(frozen=True)
class DDPMSchedule:
    """The noise schedule: cumulative alpha products for timesteps 0..T-1 (float64 on the CPU)."""

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    # one copy per device, made once: copying the table to the GPU every step would wait for the GPU each time
    _on_device: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def on(self, device: torch.device) -> torch.Tensor:
        """`alphas_cumprod` on `device` (the same tensor every call)."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = self.alphas_cumprod.to(device)
        return self._on_device[key]

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @classmethod
    def scaled_linear(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        prediction_type: str = "epsilon",
        zero_terminal_snr: bool = False,
    ) -> "DDPMSchedule":
        """The schedule every SD 1.x/2.x/XL checkpoint was trained with (betas linear in sqrt space)."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        return cls(alphas_cumprod, prediction_type)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio a_t / (1 - a_t) for each timestep (float32, on the timesteps' device)."""
        a = self.on(timesteps.device)[timesteps]
        return (a / (1.0 - a)).float()


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(a_t) so that sqrt(a_T) = 0 while sqrt(a_0) is kept (Lin et al. 2023, Alg. 1)."""
    sqrt_a = alphas_cumprod.sqrt()
    first, last = sqrt_a[0].clone(), sqrt_a[-1].clone()
    sqrt_a = (sqrt_a - last) * first / (first - last)
    return sqrt_a**2


def sample_timesteps(
    batch_size: int,
    schedule: DDPMSchedule,
    min_timestep: int | None,
    max_timestep: int | None,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniform integer timesteps in [min, max) as sd-scripts draws them (all = max when min >= max).

    In the min >= max case sd-scripts would index past the schedule for max = T; the value is capped at T - 1.
    """
    low = 0 if min_timestep is None else min_timestep
    high = schedule.num_train_timesteps if max_timestep is None else max_timestep
    if low >= high:
        return torch.full((batch_size,), min(high, schedule.num_train_timesteps - 1), dtype=torch.long, device=device)
    return torch.randint(low, high, (batch_size,), device=device, dtype=torch.long, generator=generator)


def _coefficients(schedule: DDPMSchedule, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = schedule.on(timesteps.device)[timesteps]
    shape = (-1,) + (1,) * (like.ndim - 1)
    return a.sqrt().to(like.dtype).view(shape), (1.0 - a).sqrt().to(like.dtype).view(shape)


def add_noise(schedule: DDPMSchedule, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise."""
    signal, sigma = _coefficients(schedule, timesteps, latents)
    return signal * latents + sigma * noise


def training_target(schedule: DDPMSchedule, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the denoiser should output: the noise (epsilon) or the velocity v."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        signal, sigma = _coefficients(schedule, timesteps, latents)
        return signal * noise - sigma * latents
    raise ValueError(f"unknown prediction type {schedule.prediction_type!r}")


@dataclass(frozen=True)
class NoisedBatch:
    """Inputs and target of one denoising step; `timesteps` are what the denoiser is conditioned on."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


@dataclass(frozen=True)
class DDPMObjective:
    """One SD-style training step's noising, target, element-wise loss and per-sample weights.

    sd-scripts' `get_noise_noisy_latents_and_timesteps` and `post_process_loss` over pure functions
    (`lorakit.objectives.noise`, `lorakit.objectives.losses`).

    `weight_schedule` is the schedule the SNR loss weights (min-SNR, scale_v_pred, v_pred_like, debiased) read.
    With --zero_terminal_snr it stays the ORIGINAL scaled-linear schedule, as in sd-scripts (which computes its
    SNR table before rescaling the betas): the rescaled schedule has SNR = 0 at the last timestep, where the
    epsilon forms min(SNR, g)/SNR, 1/sqrt(SNR) and (SNR + 1)/SNR are undefined or infinite, and keeping the
    original table keeps the weights of a run identical to sd-scripts'. The Huber `snr` threshold, like
    sd-scripts', reads the training schedule itself (there a_T = 0 gives c = huber_c).
    """

    schedule: DDPMSchedule
    min_timestep: int | None = None
    max_timestep: int | None = None
    noise_options: NoiseOptions = field(default_factory=NoiseOptions)
    loss_options: LossOptions = field(default_factory=LossOptions)
    weight_schedule: DDPMSchedule | None = None

    @property
    def v_prediction(self) -> bool:
        return self.schedule.prediction_type == "v_prediction"

    def noise(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> NoisedBatch:
        """Noise, timesteps and target for one batch; the noisy input carries the input perturbation, the target not."""
        noise = sample_training_noise(latents, self.noise_options, generator)
        timesteps = sample_timesteps(
            latents.shape[0], self.schedule, self.min_timestep, self.max_timestep, latents.device, generator
        )
        noisy = add_noise(self.schedule, latents, noise.input, timesteps)
        return NoisedBatch(noisy, timesteps, training_target(self.schedule, latents, noise.target, timesteps))

    def at_timestep(self, timestep: int) -> "DDPMObjective":
        """The same objective with every sample at `timestep` (the validation loss's fixed timesteps)."""
        return replace(self, min_timestep=int(timestep), max_timestep=int(timestep))

    @classmethod
    def from_options(cls, cfg: Any, prediction_type: str) -> "DDPMObjective":
        """The objective for the training options in `cfg` (sd-scripts option names)."""
        zero_terminal_snr = bool(getattr(cfg, "zero_terminal_snr", False))
        schedule = DDPMSchedule.scaled_linear(prediction_type=prediction_type, zero_terminal_snr=zero_terminal_snr)
        return cls(
            schedule,
            getattr(cfg, "min_timestep", None),
            getattr(cfg, "max_timestep", None),
            NoiseOptions.from_options(cfg),
            LossOptions.from_options(cfg),
            DDPMSchedule.scaled_linear(prediction_type=prediction_type) if zero_terminal_snr else None,
        )

    def elementwise_loss(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The loss per element (reduction happens in the loop, after masking)."""
        options = self.loss_options
        threshold = None
        if options.uses_huber:
            threshold = huber_threshold(
                timesteps,
                options.huber_schedule,
                options.huber_c,
                options.huber_scale,
                self.schedule.on(timesteps.device),
                self.schedule.num_train_timesteps,
            )
        return elementwise_loss(prediction, target, options.loss_type, threshold)

    def snr_for_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """SNR_t of the schedule the loss weights read (see the class docstring)."""
        return (self.weight_schedule or self.schedule).snr(timesteps)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample multipliers from the timesteps (the SNR-based chain of sd-scripts); None means all 1."""
        if not self.loss_options.uses_snr_weights:
            return None
        return post_process_weights(self.snr_for_weights(timesteps), self.loss_options, self.v_prediction)
