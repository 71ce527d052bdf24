"""The training noise of SD-style DDPM training, with sd-scripts' noise options.

- noise offset (Guttenberg 2023, "Diffusion with Offset Noise", crosslabs.org): add o * n_bc, one normal draw
  per sample and channel broadcast over H and W, so the model learns to change the mean brightness. With
  `adaptive_noise_scale` a, o becomes o + a * |mean_HW(latents)| per sample and channel, clamped at 0.
- multi-resolution (pyramid) noise (Whitaker 2023, "Multi-Resolution Noise for Diffusion Model Training"): add
  bilinearly upsampled normal noise of sizes H / r^i, W / r^i (r ~ U(2, 4) per level) weighted discount^i, then
  divide by the standard deviation of the whole batch.
- input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias", arXiv:2301.11706): the noisy
  input is built from noise + gamma * xi while the target keeps the unperturbed noise.

Draw order per step (all from `generator`, or the global RNG when it is None): base noise; the offset's random
strength, then its (B, C, 1, 1) draw; per pyramid level the ratio r, then the coarse noise; the perturbation's
random strength, then its draw. sd-scripts draws the pyramid ratio from Python's `random`; drawing it from torch
keeps a seeded run and a resumed run reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def _randn(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def _uniform(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One U(0, 1) draw as a 1-element tensor (kept on the device: no host sync)."""
    return torch.rand(1, generator=generator, device=device)


def random_strength(value: float, randomise: bool, device: torch.device, generator: torch.Generator | None = None):
    """`value`, or `value * U(0, 1)` (one scalar per step) when `randomise` is set."""
    if not randomise:
        return value
    return _uniform(generator, device) * value


def offset_noise(
    latents: torch.Tensor,
    noise: torch.Tensor,
    offset: float | torch.Tensor,
    adaptive_scale: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """noise + o * n with n ~ N(0, 1) of shape (B, C, 1, ...); o per sample/channel when `adaptive_scale` is set."""
    spatial = tuple(range(2, latents.ndim))
    if adaptive_scale is not None:
        # brighter or darker latents get a larger offset; the clamp guards a negative adaptive scale
        channel_mean = latents.mean(dim=spatial, keepdim=True).abs()
        offset = torch.clamp(offset + adaptive_scale * channel_mean, min=0.0)
    if isinstance(offset, torch.Tensor):
        offset = offset.to(device=noise.device, dtype=noise.dtype)
    shape = tuple(latents.shape[:2]) + (1,) * len(spatial)
    return noise + offset * _randn(shape, noise, generator)


def pyramid_noise(
    noise: torch.Tensor, iterations: int, discount: float = 0.3, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Multi-resolution noise over a (B, C, H, W) noise tensor, renormalised to unit standard deviation.

    Level i draws r ~ U(2, 4) and adds upsample(N(0, 1) of size (max(1, int(H / r^i)), max(1, int(W / r^i))))
    * discount^i; level 0 is a second full-resolution draw of weight 1. It stops after the level where a side
    reaches 1. The input is not modified.
    """
    batch, channels, height, width = noise.shape
    ratio_device = generator.device if generator is not None else torch.device("cpu")
    out = noise
    for level in range(iterations):
        # the ratio decides tensor sizes, so it is needed on the host: drawn on the CPU (no device sync)
        # unless the caller's generator lives elsewhere
        ratio = 2.0 + 2.0 * torch.rand(1, generator=generator, device=ratio_device).item()
        size = (max(1, int(height / ratio**level)), max(1, int(width / ratio**level)))
        coarse = _randn((batch, channels) + size, noise, generator)
        upsampled = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        out = out + upsampled * discount**level
        if 1 in size:
            break
    return out / out.std()


def perturb_noise(
    noise: torch.Tensor, gamma: float | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Input perturbation: noise + gamma * xi, xi ~ N(0, 1) (Ning et al. 2023, eq. 9)."""
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.to(device=noise.device, dtype=noise.dtype)
    return noise + gamma * _randn(tuple(noise.shape), noise, generator)


@dataclass(frozen=True)
class NoiseOptions:
    """The noise options of sd-scripts; a falsy offset, iteration count or gamma switches its step off."""

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False

    @classmethod
    def from_options(cls, cfg: Any) -> "NoiseOptions":
        """Read the sd-scripts option names from any object (a config model or a namespace)."""
        discount = getattr(cfg, "multires_noise_discount", 0.3)
        return cls(
            noise_offset=getattr(cfg, "noise_offset", None) or None,
            noise_offset_random_strength=bool(getattr(cfg, "noise_offset_random_strength", False)),
            adaptive_noise_scale=getattr(cfg, "adaptive_noise_scale", None),
            multires_noise_iterations=getattr(cfg, "multires_noise_iterations", None) or None,
            multires_noise_discount=0.3 if discount is None else float(discount),
            ip_noise_gamma=getattr(cfg, "ip_noise_gamma", None) or None,
            ip_noise_gamma_random_strength=bool(getattr(cfg, "ip_noise_gamma_random_strength", False)),
        )


@dataclass(frozen=True)
class TrainingNoise:
    """`target`: the noise the objective's target is built from; `input`: the noise added to the latents."""

    target: torch.Tensor
    input: torch.Tensor


def sample_training_noise(
    latents: torch.Tensor, options: NoiseOptions, generator: torch.Generator | None = None
) -> TrainingNoise:
    """Base noise, then offset, then pyramid noise (sd-scripts' order), then the input perturbation."""
    noise = _randn(tuple(latents.shape), latents, generator)
    if options.noise_offset:
        offset = random_strength(options.noise_offset, options.noise_offset_random_strength, latents.device, generator)
        noise = offset_noise(latents, noise, offset, options.adaptive_noise_scale, generator)
    if options.multires_noise_iterations:
        noise = pyramid_noise(noise, options.multires_noise_iterations, options.multires_noise_discount, generator)
    if not options.ip_noise_gamma:
        return TrainingNoise(noise, noise)
    gamma = random_strength(options.ip_noise_gamma, options.ip_noise_gamma_random_strength, latents.device, generator)
    return TrainingNoise(noise, perturb_noise(noise, gamma, generator))
