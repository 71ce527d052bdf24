"""A tiny SDXL model: the real architecture at toy widths, with random weights.

Built from the same config classes as SDXL base (a `text_time` UNet with linear projections and several
transformer layers per block, CLIP-L + OpenCLIP-bigG-with-projection text encoders, the SD VAE) and the real
CLIP vocabulary, so key conversion, conditioning and LoRA naming run on it in milliseconds. The two text
encoders have different widths (32 and 64) like the real ones (768 and 1280): diffusers' single-file loader
tells them apart by width, and equal widths would hide a swapped-encoder bug.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lorakit.families.base import Components
from lorakit.families.common.checkpoint_io import save_pipeline_atomic
from lorakit.families.common.tokenizers import CLIP_PAD_END, CLIP_PAD_OPENCLIP, bundled_clip_tokenizer
from lorakit.families.sdxl.loading import bundled_config, noise_scheduler_config
from lorakit.toy.tiny_models import tiny_vae_config

TE1_WIDTH, TE2_WIDTH, TIME_EMBED_DIM = 32, 64, 8


def tiny_unet_config() -> dict[str, Any]:
    """Two levels, attention only at the second (as SDXL has none at its first), two transformer layers in
    the second level's blocks; the add-embedding input is 6 size numbers x 8 + the pooled width."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TE2_WIDTH,
        cross_attention_dim=TE1_WIDTH + TE2_WIDTH,
        norm_num_groups=8,
    )


def tiny_text_config(width: int, openclip: bool) -> CLIPTextConfig:
    """The real vocabulary; quick_gelu for OpenAI CLIP-L, gelu and pad id 0 for OpenCLIP-bigG."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_attention_heads=4,
        num_hidden_layers=3 if openclip else 2,
        max_position_embeddings=77,
        projection_dim=width,
        hidden_act="gelu" if openclip else "quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0 if openclip else 49407,
    )


def build_tiny_sdxl(seed: int = 0, v_parameterization: bool = False) -> Components:
    """A tiny SDXL model in eval mode (64 px images -> 8x8 latents)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config()).eval()
    vae = AutoencoderKL(**{**tiny_vae_config(), "scaling_factor": bundled_config("vae")["scaling_factor"]}).eval()
    te1 = CLIPTextModel(tiny_text_config(TE1_WIDTH, openclip=False)).eval()
    te2 = CLIPTextModelWithProjection(tiny_text_config(TE2_WIDTH, openclip=True)).eval()
    tokenizers = [bundled_clip_tokenizer(CLIP_PAD_END), bundled_clip_tokenizer(CLIP_PAD_OPENCLIP)]
    extras = {
        "noise_scheduler_config": noise_scheduler_config(v_parameterization),
        "prediction_type": "v_prediction" if v_parameterization else "epsilon",
        "source": "tiny-sdxl",
    }
    return Components(unet, vae, [te1, te2], tokenizers, extras)


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
