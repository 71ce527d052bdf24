"""Tiny Stable Diffusion 1.x/2.x models: the real architectures at toy widths, with random weights.

They are built from the same config classes as the real models (diffusers `UNet2DConditionModel` and
`AutoencoderKL`, transformers `CLIPTextModel`) and use the real 49,408-token CLIP vocabulary, so every code
path that touches a real checkpoint (key conversion, adapters, tokenization, sampling) runs on them in
milliseconds. 64 px images map to 8x8 latents, the same factor 8 as the real VAE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from lorakit.families.base import Components
from lorakit.families.common.tiny_parts import tiny_vae_config
from lorakit.families.common.tokenizers import (
    CLIP_PAD_END,
    CLIP_PAD_OPENCLIP,
    bundled_clip_tokenizer,
)
from lorakit.families.sd.loading import noise_scheduler_config
from lorakit.families.sd.model_files import save_sd_diffusers_folder  # noqa: F401 (the fixtures' folder writer)

TinyVersion = Literal["sd1", "sd2", "sd2v"]


def tiny_unet_config(version: TinyVersion) -> dict[str, Any]:
    """Two resolution levels, attention only at the first, as in the feasibility study's tiny SD."""
    config: dict[str, Any] = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    if version != "sd1":
        config["use_linear_projection"] = True  # SD 2.x's transformer blocks use Linear proj_in/proj_out
    return config


def tiny_text_config(version: TinyVersion) -> CLIPTextConfig:
    """Hidden 32, 2 layers, the real vocabulary; quick_gelu as OpenAI CLIP (SD 1.x), gelu as OpenCLIP (SD 2.x)."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=128,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="quick_gelu" if version == "sd1" else "gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407 if version == "sd1" else 0,
    )


def build_tiny_sd(version: TinyVersion = "sd1", seed: int = 0) -> Components:
    """A tiny SD 1.x ("sd1"), SD 2.x-base ("sd2") or SD 2.x-v ("sd2v") model in eval mode."""
    if version not in ("sd1", "sd2", "sd2v"):
        raise ValueError(f"version must be 'sd1', 'sd2' or 'sd2v', not {version!r}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(version)).eval()
    vae = AutoencoderKL(**tiny_vae_config()).eval()
    text_encoder = CLIPTextModel(tiny_text_config(version)).eval()
    tokenizer = bundled_clip_tokenizer(CLIP_PAD_END if version == "sd1" else CLIP_PAD_OPENCLIP)
    prediction_type = "v_prediction" if version == "sd2v" else "epsilon"
    extras = {
        "noise_scheduler_config": noise_scheduler_config(version != "sd1", version == "sd2v"),
        "prediction_type": prediction_type,
        "version": "sd1" if version == "sd1" else "sd2",
        "source": f"tiny-{version}",
    }
    return Components(unet, vae, [text_encoder], [tokenizer], extras)


# ---------------------------------------------------------------------------------------------------------
# `lorakit bench`: the tiny model, or SD 1.5's real shapes with random weights, as an LDM single file
# ---------------------------------------------------------------------------------------------------------

BENCH_ALIASES = {"sd15": "real"}  # `lorakit bench --size sd15` is this family at real size


def bench_files(size: str, folder: Path, blocks: tuple[int, int] | None = None) -> tuple[list[str], list[str]]:
    """The `lorakit train` options naming the benchmark model's files (written on first use), and notes."""
    from lorakit.families.common.bench_files import single_file
    from lorakit.families.common.ldm_keys import save_sd_single_file

    return single_file(folder, lambda path: save_sd_single_file(build_bench_model(size), path)), []


def build_bench_model(size: str) -> Components:
    if size == "tiny":
        return build_tiny_sd("sd1", seed=0)
    from lorakit.families.common.bench_files import clean_config
    from lorakit.families.sd.loading import bundled_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**clean_config(bundled_config("sd15", "unet")))
    vae = AutoencoderKL(**clean_config(bundled_config("sd15", "vae")))
    text = CLIPTextModel(CLIPTextConfig(**clean_config(bundled_config("sd15", "text_encoder"))))
    return Components(unet.eval(), vae.eval(), [text.eval()], [bundled_clip_tokenizer()], {"prediction_type": "epsilon"})
