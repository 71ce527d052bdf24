"""Tiny Chroma models of the real architecture (random weights) and writers for both file layouts.

Used by the tests, the conformance suite and `lorakit bench`: a ChromaTransformer2DModel with 1 double and 2 single
blocks (head width 16 = RoPE axes 4+6+6, an approximator of 2 layers), the 16-channel FLUX autoencoder shape at 4
levels (64 px -> 8x8 latents) and a T5 encoder over lorakit's 1,000-piece tokenizer. `save_pipeline_folder` writes
a diffusers ChromaPipeline folder; `save_bfl_files` what sd-scripts takes (`chroma.safetensors` in the original
layout, `t5xxl.safetensors`, `ae.safetensors`), each with its architecture in the `lorakit.configs` metadata.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ChromaTransformer2DModel
from transformers import T5Config, T5EncoderModel

from lorakit.checkpoint_io import write_safetensors_atomic
from lorakit.families.base import Components
from lorakit.families.chroma import bfl_keys
from lorakit.families.chroma.loading import flow_scheduler
from lorakit.families.common.bfl_parts import configs_metadata
from lorakit.families.common.ldm_keys import vae_to_ldm
from lorakit.families.common.tiny_parts import (
    T5_TOKENIZER_ASSET,
    TINY_T5_MAX_LENGTH,
    bundled_tiny_t5_tokenizer,
)

TINY_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=16, approximator_hidden_dim=32,
    approximator_layers=2,
)
TINY_AE = dict(
    in_channels=3, out_channels=3, block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16,
    sample_size=64, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
)
TINY_T5 = dict(
    vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)


def build_tiny_chroma(seed: int = 0) -> Components:
    """Random tiny Chroma components (eval mode: the tiny T5 has dropout, which would make outputs random)."""
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(**TINY_TRANSFORMER)
    vae = AutoencoderKL(**TINY_AE)
    t5 = T5EncoderModel(T5Config(**TINY_T5))
    modules = [m.eval() for m in (transformer, vae, t5)]
    return Components(modules[0], modules[1], [modules[2]], [bundled_tiny_t5_tokenizer(TINY_T5_MAX_LENGTH)], {})


def save_pipeline_folder(comps: Components, folder: str | Path) -> Path:
    """A diffusers ChromaPipeline folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/)."""
    from diffusers import ChromaPipeline

    pipe = ChromaPipeline(scheduler=flow_scheduler(), vae=comps.vae, text_encoder=comps.text_encoders[0],
                          tokenizer=comps.tokenizers[0], transformer=comps.denoiser)
    pipe.save_pretrained(str(folder))
    return Path(folder)


def save_bfl_files(comps: Components, folder: str | Path, *, comfy_prefix: bool = False) -> dict[str, Path]:
    """sd-scripts' three Chroma files; the tiny T5 tokenizer goes beside the T5 file, where a user's would be.
    `comfy_prefix` stores the transformer under ComfyUI's `model.diffusion_model.` prefix."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t5 = comps.text_encoders[0]
    files = {name: folder / f"{name}.safetensors" for name in ("chroma", "t5xxl", "ae")}
    prefix = "model.diffusion_model." if comfy_prefix else ""
    transformer_state = bfl_keys.diffusers_to_bfl(comps.denoiser.state_dict(), prefix)
    write_safetensors_atomic(transformer_state, files["chroma"], configs_metadata("transformer", comps.denoiser.config))
    t5_state = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    write_safetensors_atomic(t5_state, files["t5xxl"], configs_metadata("t5xxl", t5.config.to_dict()))
    ae_state = vae_to_ldm(comps.vae.state_dict(), dict(comps.vae.config), prefix="")
    write_safetensors_atomic(ae_state, files["ae"], configs_metadata("ae", comps.vae.config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(T5_TOKENIZER_ASSET / name, folder / name)
    return files


# ---------------------------------------------------------------------------------------------------------
# `lorakit bench`: the tiny model, or Chroma's real shapes with random weights, as the original files
# ---------------------------------------------------------------------------------------------------------

REAL_BLOCKS = (19, 38)  # Chroma1's double and single blocks
BENCH_T5_LAYERS = 2


def bench_files(size: str, folder: Path, blocks: tuple[int, int] | None = None) -> tuple[list[str], list[str]]:
    """The `lorakit train` options naming the benchmark model's files (written on first use), and notes. Real sizes
    keep every shape the step touches, except T5-XXL's depth (2 of 24 layers: the benchmark caches its outputs)."""
    blocks = blocks or REAL_BLOCKS
    if size == "real":
        folder = folder.with_name(f"{folder.name}_{blocks[0]}x{blocks[1]}")
    files = {name: folder / f"{name}.safetensors" for name in ("chroma", "t5xxl", "ae")}
    if not all(path.exists() for path in files.values()):
        save_bfl_files(build_bench_model(size, blocks), folder)
    args = [f"--pretrained_model_name_or_path={files['chroma']}", f"--t5xxl={files['t5xxl']}", f"--ae={files['ae']}"]
    notes = [] if size == "tiny" else [
        f"Chroma transformer {blocks[0]} double + {blocks[1]} single blocks at width 3072; "
        f"T5 at width 4096 with {BENCH_T5_LAYERS} layers (outputs cached before the first step)"]
    return args, notes


def build_bench_model(size: str, blocks: tuple[int, int] = REAL_BLOCKS) -> Components:
    if size == "tiny":
        return build_tiny_chroma(seed=0)
    from lorakit.families.chroma.loading import bundled_config
    from lorakit.families.common.bench_files import clean_config, default_dtype
    from lorakit.families.common.bfl_parts import shared_config

    comps = build_tiny_chroma(seed=0)  # for its tokenizer; its 1,000 pieces fit the T5 below
    torch.manual_seed(0)
    with default_dtype(torch.bfloat16):
        transformer = ChromaTransformer2DModel.from_config({**bundled_config(), "num_layers": blocks[0], "num_single_layers": blocks[1]})
        vae = AutoencoderKL.from_config(shared_config("ae"))
        t5 = T5EncoderModel(T5Config(**{**clean_config(shared_config("t5xxl")), "num_layers": BENCH_T5_LAYERS, "vocab_size": 1000}))
    comps.denoiser, comps.vae, comps.text_encoders = transformer.eval(), vae.eval(), [t5.eval()]
    return comps
