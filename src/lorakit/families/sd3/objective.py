"""The rectified-flow objective as SD3 is trained (sd-scripts' `sd3_train_network.py`).

Same forward process as `flow.py` (x_σ = (1 − σ) x₀ + σ ε), with SD3's own conventions:

* u is drawn from the weighting scheme's density (`flow.density_samples`: logit-normal, mode or uniform;
  Esser et al. 2024, arXiv:2403.03206, §3.1), then shifted by `--training_shift` s as σ' = s·u / (1 + (s − 1)·u)
  (their eq. 23, the resolution shift), then quantised to an integer timestep t ∈ [min_timestep, max_timestep)
  and σ = t / 1000 — the MMDiT's timestep embedding reads t on the 0..1000 scale;
* the network output v is preconditioned to an x₀ estimate, x̂₀ = x_σ − σ·v (Karras et al. 2022, §5), and the
  loss compares it with x₀. Since x_σ − x₀ = σ(ε − x₀), that is σ²·‖v − (ε − x₀)‖², so `sigma_sqrt` (σ⁻²)
  gives back the plain velocity loss and `cosmap` weights by the cosine map's density.

No noise offset, pyramid noise, input-perturbation noise or min-SNR weighting applies to SD3, as in sd-scripts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch

from lorakit.objectives.ddpm import NoisedBatch
from lorakit.objectives.flow import (
    NUM_TRAIN_TIMESTEPS,
    WEIGHTING_SCHEMES,
    add_flow_noise,
    density_samples,
    flow_elementwise_loss,
    loss_weighting,
    option_or_default,
    shift_sigmas,
)
from lorakit.objectives.losses import LossOptions


@dataclass(frozen=True)
class SD3FlowOptions:
    """sd-scripts' SD3 options with their defaults."""

    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    training_shift: float = 1.0
    min_timestep: int = 0
    max_timestep: int = NUM_TRAIN_TIMESTEPS

    @classmethod
    def from_options(cls, cfg: Any) -> "SD3FlowOptions":
        get = partial(option_or_default, cfg)
        return cls(
            weighting_scheme=get("weighting_scheme", "uniform"), logit_mean=float(get("logit_mean", 0.0)),
            logit_std=float(get("logit_std", 1.0)), mode_scale=float(get("mode_scale", 1.29)),
            training_shift=float(get("training_shift", 1.0)), min_timestep=int(get("min_timestep", 0)),
            max_timestep=int(get("max_timestep", NUM_TRAIN_TIMESTEPS)),
        )

    def __post_init__(self) -> None:
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"--weighting_scheme {self.weighting_scheme!r}: expected one of {', '.join(WEIGHTING_SCHEMES)}")
        if self.training_shift <= 0:
            raise ValueError(f"--training_shift {self.training_shift}: must be positive")


def sample_sd3_timesteps(
    options: SD3FlowOptions, batch_size: int, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Integer-valued timesteps t (float32, shape (B,)); σ = t / 1000."""
    u = density_samples(
        options.weighting_scheme, batch_size, logit_mean=options.logit_mean, logit_std=options.logit_std,
        mode_scale=options.mode_scale, device=device, generator=generator,
    )
    u = shift_sigmas(u, options.training_shift)
    low, high = options.min_timestep, options.max_timestep
    return (u * (high - low) + low).long().clamp(low, max(low, high - 1)).float()


def precondition_to_x0(output: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x̂₀ = x_σ − σ·v: the velocity output turned into a clean-latent estimate."""
    sigma = sigmas.to(device=output.device, dtype=output.dtype).view((-1,) + (1,) * (output.ndim - 1))
    return output * (-sigma) + noisy


@dataclass(frozen=True)
class SD3FlowObjective:
    """σ sampling, noising and the x₀ target for SD3; the family's `predict` does the preconditioning."""

    options: SD3FlowOptions = field(default_factory=SD3FlowOptions)
    loss_options: LossOptions = field(default_factory=LossOptions)

    @classmethod
    def from_options(cls, cfg: Any) -> "SD3FlowObjective":
        return cls(SD3FlowOptions.from_options(cfg), LossOptions.from_options(cfg))

    def noise(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> NoisedBatch:
        """Noisy latents, timesteps (σ·1000, whole numbers) and the target x₀."""
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=generator)
        timesteps = sample_sd3_timesteps(self.options, latents.shape[0], device=latents.device, generator=generator)
        noisy = add_flow_noise(latents, noise, timesteps / NUM_TRAIN_TIMESTEPS)
        return NoisedBatch(noisy, timesteps, latents)

    def elementwise_loss(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return flow_elementwise_loss(self.loss_options, prediction, target, timesteps)

    def at_timestep(self, timestep: int) -> "SD3FlowObjective":
        """The same objective with every sample at `timestep` (sd-scripts' validation sets min = max = t)."""
        return replace(self, options=replace(self.options, min_timestep=int(timestep), max_timestep=int(timestep)))

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """`sigma_sqrt` σ⁻² or `cosmap`; the other schemes only change how σ is drawn.

        t = 0 (σ = 0) would give σ⁻² = ∞ times a zero loss, a NaN; it is weighted as t = 1 instead.
        """
        if self.options.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None
        return loss_weighting(self.options.weighting_scheme, timesteps.clamp(min=1) / NUM_TRAIN_TIMESTEPS)
