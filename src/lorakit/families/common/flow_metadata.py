"""The `ss_*` metadata keys every flow-matching family writes for its timestep and loss-weighting options.

sd-scripts' SD3 script records the weighting scheme and its three parameters; its FLUX script adds the
timestep sampling, sigmoid scale and flow shift; the families sd-scripts does not train (Qwen-Image, Z-Image,
FLUX.2) write the FLUX set, as musubi-tuner does."""

from __future__ import annotations

from typing import Any


def weighting_metadata(cfg: Any) -> dict[str, str]:
    """The loss-weighting keys (sd-scripts' SD3 set)."""
    return {
        "ss_weighting_scheme": str(cfg.weighting_scheme),
        "ss_logit_mean": str(cfg.logit_mean),
        "ss_logit_std": str(cfg.logit_std),
        "ss_mode_scale": str(cfg.mode_scale),
    }


def flow_sampling_metadata(cfg: Any) -> dict[str, str]:
    """The weighting keys plus how timesteps are drawn (sd-scripts' FLUX set)."""
    return {
        **weighting_metadata(cfg),
        "ss_timestep_sampling": str(cfg.timestep_sampling),
        "ss_sigmoid_scale": str(cfg.sigmoid_scale),
        "ss_discrete_flow_shift": str(cfg.discrete_flow_shift),
    }
