"""The `--sample_sampler` names of sd-scripts mapped to diffusers schedulers over the DDPM training schedule (SD 1.x/2.x, SDXL)."""

from __future__ import annotations

from typing import Any

import diffusers

# name -> (scheduler class name, extra keyword arguments)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
}


def build_sampler(name: str, prediction_type: str) -> Any:
    """A scheduler for sampling with the SD training schedule; unknown names fall back to DDIM as in sd-scripts."""
    class_name, extra = SAMPLERS.get(name.lower(), SAMPLERS["ddim"])
    cls = getattr(diffusers, class_name)
    kwargs = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type)
    if class_name in ("DDIMScheduler", "DDPMScheduler"):
        kwargs["clip_sample"] = False
    if extra.get("algorithm_type") == "dpmsolver":
        kwargs["final_sigmas_type"] = "sigma_min"  # diffusers refuses its default "zero" for first-order dpmsolver
    if class_name == "DDIMScheduler":
        kwargs["set_alpha_to_one"] = False
        kwargs["steps_offset"] = 1
    return cls(**kwargs, **extra)
