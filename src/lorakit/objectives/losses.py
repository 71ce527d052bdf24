"""Element-wise loss types, scheduled Huber thresholds and SNR-based loss weights (sd-scripts' loss options).

Loss types (element-wise, before masking and the per-sample mean):
- ``l2`` squared error, ``l1`` absolute error;
- ``huber``: the pseudo-Huber loss 2c(sqrt(d^2 + c^2) - c) (Charbonnier et al. 1994; used for diffusion by
  Song & Dhariwal 2023, arXiv:2310.14189), which is ~c d^2 for |d| << c and ~2c|d| for |d| >> c;
- ``smooth_l1``: the same without the leading c, 2(sqrt(d^2 + c^2) - c), i.e. ~d^2/c near 0 and ~2|d| far out.

The threshold c may follow the timestep (Khrapov et al. 2024, "Scheduled Pseudo-Huber Loss", arXiv:2403.16728):
``constant`` c = huber_c * huber_scale; ``exponential`` c = huber_scale * exp(-a t) with a = -ln(huber_c) / T,
so c falls from huber_scale at t = 0 to huber_c * huber_scale at t = T; ``snr`` c = (1 - huber_c) / (1 + sigma_t)^2
+ huber_c with sigma_t = sqrt((1 - a_t) / a_t), which needs a DDPM schedule and ignores huber_scale (as in
sd-scripts).

SNR weights, SNR_t = a_t / (1 - a_t) and SNR'_t = min(SNR_t, 1000):
- min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556): epsilon min(SNR, g) / SNR, v min(SNR, g) / (SNR + 1);
- scale_v_pred_loss_like_noise_pred: SNR' / (SNR' + 1), the ratio between the v and epsilon losses of the same
  error in x_0, since ||v - v_hat||^2 = (SNR + 1) / SNR * ||eps - eps_hat||^2 (Salimans & Ho 2022, arXiv:2202.00512);
- v_pred_like_loss l: loss + l * loss * (SNR' + 1) / SNR', an added v-style term for epsilon models;
- debiased estimation (Yu et al. 2024, "Debias the Training of Diffusion Models", arXiv:2310.08442):
  epsilon 1 / sqrt(SNR'), v 1 / (SNR' + 1).
They are applied in sd-scripts' order: min-SNR, scale_v_pred, v_pred_like, debiased.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
SNR_CAP = 1000.0


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a (B,) tensor over the non-batch dimensions of `like`."""
    return values.to(device=like.device, dtype=like.dtype).view((-1,) + (1,) * (like.ndim - 1))


def elementwise_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """The loss of each element; `huber_c` is the per-sample threshold (B,) for `huber` and `smooth_l1`."""
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(prediction, target, reduction="none")
    if loss_type == "l1":
        return torch.nn.functional.l1_loss(prediction, target, reduction="none")
    if loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs a Huber threshold per sample")
    c = _per_sample(huber_c, prediction)
    # sqrt(d^2 + c^2) - c is the Charbonnier form: smooth at 0, linear in |d| far from it
    charbonnier = torch.sqrt((prediction - target) ** 2 + c**2) - c
    return 2 * c * charbonnier if loss_type == "huber" else 2 * charbonnier


def huber_threshold(
    timesteps: torch.Tensor,
    schedule: str = "snr",
    huber_c: float = 0.1,
    huber_scale: float = 1.0,
    alphas_cumprod: torch.Tensor | None = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """The pseudo-Huber threshold c(t) per sample (float32, on the timesteps' device); see the module docstring.

    `alphas_cumprod` is the training schedule (after any zero-terminal-SNR rescale, as sd-scripts uses it);
    only the `snr` schedule needs it. Where a_t = 0, sigma_t is infinite and c(t) = huber_c.
    """
    t = timesteps.to(torch.float32)
    if schedule == "constant":
        return torch.full_like(t, huber_c * huber_scale)
    if schedule == "exponential":
        rate = -math.log(huber_c) / num_train_timesteps
        return torch.exp(-rate * t) * huber_scale
    if schedule != "snr":
        raise ValueError(f"unknown huber_schedule {schedule!r}; expected one of {', '.join(HUBER_SCHEDULES)}")
    if alphas_cumprod is None:
        raise NotImplementedError("huber_schedule 'snr' needs a DDPM noise schedule; use constant or exponential")
    a = alphas_cumprod.to(timesteps.device)[timesteps.long()].to(torch.float64)
    sigma = ((1.0 - a) / a).sqrt()
    return ((1.0 - huber_c) / (1.0 + sigma) ** 2 + huber_c).to(torch.float32)


def capped_snr(snr: torch.Tensor) -> torch.Tensor:
    """SNR' = min(SNR, 1000): keeps the weights that divide by or take roots of SNR finite near t = 0."""
    return snr.clamp(max=SNR_CAP)


def min_snr_weight(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma weight (Hang et al. 2023, eq. 6); uses the uncapped SNR as sd-scripts does."""
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1.0) if v_prediction else clipped / snr


def v_pred_noise_scale(snr: torch.Tensor) -> torch.Tensor:
    """SNR' / (SNR' + 1): turns a v-prediction loss into the epsilon loss of the same x_0 error."""
    snr = capped_snr(snr)
    return snr / (snr + 1.0)


def debiased_weight(snr: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """Debiased-estimation weight (Yu et al. 2024): 1/sqrt(SNR') for epsilon, 1/(SNR' + 1) for v."""
    snr = capped_snr(snr)
    return 1.0 / (snr + 1.0) if v_prediction else 1.0 / snr.sqrt()


@dataclass(frozen=True)
class LossOptions:
    """The loss options of sd-scripts (falsy values switch a weighting off, as there)."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False

    @classmethod
    def from_options(cls, cfg: Any) -> "LossOptions":
        """Read the sd-scripts option names from any object (a config model or a namespace)."""
        return cls(
            loss_type=getattr(cfg, "loss_type", "l2") or "l2",
            huber_schedule=getattr(cfg, "huber_schedule", "snr") or "snr",
            huber_c=float(getattr(cfg, "huber_c", 0.1)),
            huber_scale=float(getattr(cfg, "huber_scale", 1.0)),
            min_snr_gamma=getattr(cfg, "min_snr_gamma", None) or None,
            scale_v_pred_loss_like_noise_pred=bool(getattr(cfg, "scale_v_pred_loss_like_noise_pred", False)),
            v_pred_like_loss=getattr(cfg, "v_pred_like_loss", None) or None,
            debiased_estimation_loss=bool(getattr(cfg, "debiased_estimation_loss", False)),
        )

    @property
    def uses_huber(self) -> bool:
        return self.loss_type in ("huber", "smooth_l1")

    @property
    def uses_snr_weights(self) -> bool:
        return bool(
            self.min_snr_gamma
            or self.scale_v_pred_loss_like_noise_pred
            or self.v_pred_like_loss
            or self.debiased_estimation_loss
        )


def post_process_loss(loss: torch.Tensor, snr: torch.Tensor, options: LossOptions, v_prediction: bool) -> torch.Tensor:
    """Apply the SNR weightings to a per-sample loss (B,) in sd-scripts' order.

    Each step is linear in the loss it receives, so the chain equals `loss * post_process_weights(...)`; the order
    shows in v_pred_like_loss, whose added term is built from the loss already weighted by min-SNR and scale_v_pred.
    """
    snr = snr.to(device=loss.device, dtype=loss.dtype)
    if options.min_snr_gamma:
        loss = loss * min_snr_weight(snr, options.min_snr_gamma, v_prediction)
    if options.scale_v_pred_loss_like_noise_pred:
        loss = loss * v_pred_noise_scale(snr)
    if options.v_pred_like_loss:
        loss = loss + options.v_pred_like_loss * loss / v_pred_noise_scale(snr)
    if options.debiased_estimation_loss:
        loss = loss * debiased_weight(snr, v_prediction)
    return loss


def post_process_weights(snr: torch.Tensor, options: LossOptions, v_prediction: bool) -> torch.Tensor | None:
    """The per-sample multiplier the chain of `post_process_loss` amounts to; None when no weighting is on."""
    if not options.uses_snr_weights:
        return None
    return post_process_loss(torch.ones_like(snr, dtype=torch.float32), snr.float(), options, v_prediction)
