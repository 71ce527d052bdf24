"""Tiny SD3 / SD3.5 models of the real architecture (random weights) and writers for both file layouts.

Used by the tests and examples. The MMDiT has 64-px images in mind (8x8 latents, patch 2 -> 16 tokens). The text
encoders have different widths, as the real ones (CLIP-L 32 + CLIP-G 64 = 96 = pooled width; T5 128 = the joint
attention width), because loaders tell CLIP-L from CLIP-G by width. Variants follow the releases' structure:
`sd3` (no q/k norm), `sd3.5m` (RMS q/k norm and a second attention in block 0, MMDiT-X) and `sd3.5l`
(q/k norm only). `save_sai_file` writes one SAI-layout `.safetensors` with the text encoders and VAE inside
(as "sd3_medium_incl_clips_t5xxlfp16"), each architecture in the `lorakit.configs` metadata.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from lorakit.checkpoint_io import write_safetensors_atomic
from lorakit.families.base import Components
from lorakit.families.common.ldm_keys import vae_to_ldm
from lorakit.families.common.module_io import CONFIGS_METADATA_KEY
from lorakit.families.common.tiny_parts import (
    T5_TOKENIZER_ASSET,
    TINY_T5_MAX_LENGTH,
    bundled_tiny_t5_tokenizer,
)
from lorakit.families.common.tokenizers import (
    CLIP_PAD_END,
    CLIP_PAD_OPENCLIP,
    bundled_clip_tokenizer,
)
from lorakit.families.sd3 import sai_keys
from lorakit.families.sd3.model_files import (
    component_configs,
    pipeline_of,
    text_encoder_state,
)

VARIANTS = {
    "sd3": {"dual_attention_layers": (), "qk_norm": None},
    "sd3.5m": {"dual_attention_layers": (0,), "qk_norm": "rms_norm"},
    "sd3.5l": {"dual_attention_layers": (), "qk_norm": "rms_norm"},
}


def tiny_transformer(variant: str = "sd3", num_layers: int = 2) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=32, pooled_projection_dim=96,
        pos_embed_max_size=16, **VARIANTS[variant],
    )


def _clip(width: int, act: str) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, projection_dim=width, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        hidden_act=act,
    ))


def build_tiny_sd3(seed: int = 0, variant: str = "sd3", num_layers: int = 2) -> Components:
    """Random tiny SD3 components in eval mode (the tiny T5 has dropout, which would make outputs random)."""
    torch.manual_seed(seed)
    transformer = tiny_transformer(variant, num_layers)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16,
        sample_size=64, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
    )
    t5 = T5EncoderModel(T5Config(
        vocab_size=1000, d_model=128, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    encoders = [_clip(32, "quick_gelu"), _clip(64, "gelu"), t5]
    tokenizers = [bundled_clip_tokenizer(CLIP_PAD_END), bundled_clip_tokenizer(CLIP_PAD_OPENCLIP), bundled_tiny_t5_tokenizer(TINY_T5_MAX_LENGTH)]
    modules = [m.eval() for m in (transformer, vae, *encoders)]
    extras = {"model_type": sai_keys.model_type(dict(transformer.config))}
    return Components(modules[0], modules[1], modules[2:], tokenizers, extras)


def save_pipeline_folder(comps: Components, folder: str | Path) -> Path:
    """A diffusers StableDiffusion3Pipeline folder (model_index.json, transformer/, vae/, text_encoder(_2,_3)/, …)."""
    pipeline_of(comps).save_pretrained(str(folder))
    return Path(folder)


def save_sai_file(comps: Components, file: str | Path, *, include: tuple[str, ...] = ("vae", "clip_l", "clip_g", "t5xxl")) -> Path:
    """One SAI-layout file: the MMDiT plus the parts in `include`; the tiny T5 tokenizer goes beside it."""
    file = Path(file)
    configs = component_configs(comps)
    state = sai_keys.diffusers_to_sai(comps.denoiser.state_dict(), configs["transformer"])
    if "vae" in include:
        state.update(vae_to_ldm(comps.vae.state_dict(), configs["vae"], prefix=sai_keys.VAE_PREFIX))
    for name, encoder in zip(("clip_l", "clip_g", "t5xxl"), comps.text_encoders):
        if name in include:
            prefix = sai_keys.TE_PREFIXES[name]
            state.update({prefix + k: v for k, v in text_encoder_state(encoder).items()})
    kept = {k: v for k, v in configs.items() if k == "transformer" or k in include}
    write_safetensors_atomic(state, file, {CONFIGS_METADATA_KEY: json.dumps(kept, default=list)})
    _copy_t5_tokenizer(file.parent)
    return file


def save_text_encoder_files(comps: Components, folder: str | Path) -> dict[str, Path]:
    """`clip_l.safetensors`, `clip_g.safetensors`, `t5xxl.safetensors` and `vae.safetensors` (LDM), as released."""
    folder = Path(folder)
    configs = component_configs(comps)
    files = {}
    for name, encoder in zip(("clip_l", "clip_g", "t5xxl"), comps.text_encoders):
        files[name] = folder / f"{name}.safetensors"
        write_safetensors_atomic(text_encoder_state(encoder), files[name], {CONFIGS_METADATA_KEY: json.dumps({name: configs[name]}, default=list)})
    files["vae"] = folder / "vae.safetensors"
    write_safetensors_atomic(vae_to_ldm(comps.vae.state_dict(), configs["vae"], prefix=""), files["vae"],
                             {CONFIGS_METADATA_KEY: json.dumps({"vae": configs["vae"]}, default=list)})
    _copy_t5_tokenizer(folder)
    return files


def _copy_t5_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(T5_TOKENIZER_ASSET / name, folder / name)


# ---------------------------------------------------------------------------------------------------------
# `lorakit bench` and the family conformance test: the tiny model as one SAI file (no real-size model yet)
# ---------------------------------------------------------------------------------------------------------


def bench_files(size: str, folder: Path, blocks: tuple[int, int] | None = None) -> tuple[list[str], list[str]]:
    """The `lorakit train` options naming the tiny model's SAI file (written on first use), and notes."""
    if size != "tiny":
        raise ValueError("SD3 has no real-size benchmark model yet; use --size tiny")
    file = folder / "sd3.safetensors"
    if not file.exists():
        save_sai_file(build_tiny_sd3(0, "sd3.5m"), file)
    return [f"--pretrained_model_name_or_path={file}"], []
