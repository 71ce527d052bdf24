"""A tiny SDXL model: the real architecture at toy widths, with random weights.

Built from the same config classes as SDXL base (a `text_time` UNet with linear projections and several
transformer layers per block, CLIP-L + OpenCLIP-bigG-with-projection text encoders, the SD VAE) and the real
CLIP vocabulary, so key conversion, conditioning and LoRA naming run on it in milliseconds. The two text
encoders have different widths (32 and 64) like the real ones (768 and 1280): diffusers' single-file loader
tells them apart by width, and equal widths would hide a swapped-encoder bug.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lorakit.families.base import Components
from lorakit.families.common.tiny_parts import tiny_vae_config
from lorakit.families.common.tokenizers import (
    CLIP_PAD_END,
    CLIP_PAD_OPENCLIP,
    bundled_clip_tokenizer,
)
from lorakit.families.sdxl.loading import bundled_config, noise_scheduler_config
from lorakit.families.sdxl.model_files import save_sdxl_diffusers_folder  # noqa: F401 (the fixtures' folder writer)

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


# ---------------------------------------------------------------------------------------------------------
# `lorakit bench`: the tiny model, or SDXL's real shapes with random weights, as an SGM single file
# ---------------------------------------------------------------------------------------------------------


def bench_files(size: str, folder: Path, blocks: tuple[int, int] | None = None) -> tuple[list[str], list[str]]:
    """The `lorakit train` options naming the benchmark model's files (written on first use), and notes."""
    from lorakit.families.common.bench_files import single_file
    from lorakit.families.sdxl.sgm_keys import save_sdxl_single_file

    return single_file(folder, lambda path: save_sdxl_single_file(build_bench_model(size), path)), []


def build_bench_model(size: str) -> Components:
    if size == "tiny":
        return build_tiny_sdxl(seed=0)
    from transformers import CLIPTextModelWithProjection

    from lorakit.families.common.bench_files import clean_config, default_dtype

    tiny = build_tiny_sdxl(seed=0)  # for its tokenizers and scheduler extras
    torch.manual_seed(0)
    with default_dtype(torch.bfloat16):
        unet = UNet2DConditionModel(**clean_config(bundled_config("unet")))
        vae = AutoencoderKL(**clean_config(bundled_config("vae")))
        te1 = CLIPTextModel(CLIPTextConfig(**clean_config(bundled_config("text_encoder"))))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**clean_config(bundled_config("text_encoder_2"))))
    tiny.denoiser, tiny.vae, tiny.text_encoders = unet.eval(), vae.eval(), [te1.eval(), te2.eval()]
    return tiny
