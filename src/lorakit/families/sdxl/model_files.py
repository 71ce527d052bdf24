"""SDXL models written as diffusers folders (the single-file SGM writer is `sgm_keys.save_sdxl_single_file`)."""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from lorakit.checkpoint_io import save_pipeline_atomic
from lorakit.families.base import Components


def save_sdxl_diffusers_folder(components: Components, path: str | os.PathLike[str]) -> None:
    """Write a StableDiffusionXLPipeline folder that lorakit and diffusers' `from_pretrained` both load.

    Assembled beside the target and renamed into place, so an interrupted save never leaves half a model.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    te1, te2 = components.text_encoders
    tok1, tok2 = components.tokenizers
    pipeline = StableDiffusionXLPipeline(
        vae=components.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
        unet=components.denoiser, scheduler=EulerDiscreteScheduler.from_config(components.extras["noise_scheduler_config"]),
    )
    save_pipeline_atomic(pipeline, target)
