"""SD 1.x/2.x models written as diffusers folders (the single-file LDM writer is `ldm_keys.save_sd_single_file`)."""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import DDPMScheduler, StableDiffusionPipeline

from lorakit.checkpoint_io import save_pipeline_atomic
from lorakit.families.base import Components


def save_sd_diffusers_folder(components: Components, path: str | os.PathLike[str]) -> None:
    """Write a StableDiffusionPipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/) that both lorakit and diffusers' `StableDiffusionPipeline.from_pretrained` load.

    The folder is assembled beside the target and renamed into place, so an interrupted save never leaves a
    half-written model where a complete one is expected.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    scheduler = DDPMScheduler.from_config(components.extras["noise_scheduler_config"])
    pipeline = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoders[0],
        tokenizer=components.tokenizers[0],
        unet=components.denoiser,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_pipeline_atomic(pipeline, target)
