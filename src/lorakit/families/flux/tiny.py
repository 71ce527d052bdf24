"""Tiny FLUX.1 models of the real architecture (random weights) and writers for both file layouts.

Used by the tests and examples: a FluxTransformer2DModel with 1 double and 2 single blocks (head width 16 =
RoPE axes 4+6+6), the 16-channel FLUX autoencoder shape at 4 levels (64 px -> 8x8 latents), CLIP-L with the
real 49,408-token vocabulary (so the bundled CLIP tokenizer fits) and a T5 encoder over lorakit's 1,000-piece
tokenizer. `save_pipeline_folder` writes a diffusers folder; `save_bfl_files` writes what sd-scripts takes
(`flux1.safetensors` in BFL layout, `clip_l.safetensors`, `t5xxl.safetensors`, `ae.safetensors`), each with
its architecture in the `lorakit.configs` metadata so the loader can rebuild these non-standard sizes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from lorakit.checkpoint_io import write_safetensors_atomic
from lorakit.families.base import Components
from lorakit.families.common.ldm_keys import vae_to_ldm
from lorakit.families.common.module_io import CONFIGS_METADATA_KEY
from lorakit.families.common.tiny_parts import (
    T5_TOKENIZER_ASSET,
    TINY_T5_MAX_LENGTH,
    bundled_tiny_t5_tokenizer,
)
from lorakit.families.common.tokenizers import bundled_clip_tokenizer
from lorakit.families.flux import bfl_keys
from lorakit.families.flux.loading import flow_scheduler


def build_tiny_flux(seed: int = 0, *, guidance_embeds: bool = True) -> Components:
    """Random tiny FLUX.1 components (eval mode: the tiny T5 has dropout, which would make outputs random)."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16,
        sample_size=64, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407, hidden_act="quick_gelu",
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    tokenizers = [bundled_clip_tokenizer(), bundled_tiny_t5_tokenizer(TINY_T5_MAX_LENGTH)]
    modules = [m.eval() for m in (transformer, vae, clip, t5)]
    return Components(modules[0], modules[1], modules[2:], tokenizers, {"schnell": not guidance_embeds})


def save_pipeline_folder(comps: Components, folder: str | Path) -> Path:
    """A diffusers FluxPipeline folder (model_index.json, transformer/, vae/, text_encoder(_2)/, tokenizer(_2)/)."""
    from diffusers import FluxPipeline

    clip, t5 = comps.text_encoders
    pipe = FluxPipeline(
        scheduler=flow_scheduler(), vae=comps.vae, text_encoder=clip, tokenizer=comps.tokenizers[0],
        text_encoder_2=t5, tokenizer_2=comps.tokenizers[1], transformer=comps.denoiser,
    )
    pipe.save_pretrained(str(folder))
    return Path(folder)


def _configs_metadata(component: str, config: dict) -> dict[str, str]:
    clean = {k: v for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"}
    return {CONFIGS_METADATA_KEY: json.dumps({component: clean}, default=list)}


def save_bfl_files(comps: Components, folder: str | Path) -> dict[str, Path]:
    """sd-scripts' four FLUX files; the tiny T5 tokenizer goes beside the T5 file, where a user's would be."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clip, t5 = comps.text_encoders
    files = {name: folder / f"{name}.safetensors" for name in ("flux1", "clip_l", "t5xxl", "ae")}
    transformer_state = bfl_keys.diffusers_to_bfl(comps.denoiser.state_dict())
    write_safetensors_atomic(transformer_state, files["flux1"], _configs_metadata("transformer", comps.denoiser.config))
    write_safetensors_atomic(
        {f"text_model.{k}": v for k, v in clip.state_dict().items()}, files["clip_l"],
        _configs_metadata("clip_l", clip.config.to_dict()),
    )
    t5_state = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    write_safetensors_atomic(t5_state, files["t5xxl"], _configs_metadata("t5xxl", t5.config.to_dict()))
    ae_state = vae_to_ldm(comps.vae.state_dict(), dict(comps.vae.config), prefix="")
    write_safetensors_atomic(ae_state, files["ae"], _configs_metadata("ae", comps.vae.config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(T5_TOKENIZER_ASSET / name, folder / name)
    return files


# ---------------------------------------------------------------------------------------------------------
# `lorakit bench`: the tiny model, or FLUX.1's real shapes with random weights, as BFL files
# ---------------------------------------------------------------------------------------------------------

REAL_BLOCKS = (19, 38)  # FLUX.1's double and single blocks
BENCH_T5_LAYERS = 2


def bench_files(size: str, folder: Path, blocks: tuple[int, int] | None = None) -> tuple[list[str], list[str]]:
    """The `lorakit train` options naming the benchmark model's files (written on first use), and notes.

    Real sizes keep every shape the step touches. One exception, said in the notes: T5-XXL keeps its width (4096,
    what the transformer reads) but only 2 of its 24 layers, because the benchmark caches text-encoder outputs, so
    T5 runs once, before the first step; `blocks` (double, single) can shorten the transformer the same way."""
    blocks = blocks or REAL_BLOCKS
    if size == "real":
        folder = folder.with_name(f"{folder.name}_{blocks[0]}x{blocks[1]}")
    files = {name: folder / f"{name}.safetensors" for name in ("flux1", "clip_l", "t5xxl", "ae")}
    if not all(path.exists() for path in files.values()):
        save_bfl_files(build_bench_model(size, blocks), folder)
    args = [f"--pretrained_model_name_or_path={files['flux1']}", f"--clip_l={files['clip_l']}",
            f"--t5xxl={files['t5xxl']}", f"--ae={files['ae']}"]
    notes = [] if size == "tiny" else [
        f"FLUX transformer {blocks[0]} double + {blocks[1]} single blocks at width 3072; "
        f"T5 at width 4096 with {BENCH_T5_LAYERS} layers (outputs cached before the first step)"]
    return args, notes


def build_bench_model(size: str, blocks: tuple[int, int] = REAL_BLOCKS) -> Components:
    if size == "tiny":
        return build_tiny_flux(seed=0)
    from diffusers import FluxTransformer2DModel

    from lorakit.families.common.bench_files import clean_config, default_dtype
    from lorakit.families.flux.loading import bundled_config

    comps = build_tiny_flux(seed=0)  # for its tokenizers; the tiny T5 tokenizer's 1,000 pieces fit the T5 below
    torch.manual_seed(0)
    with default_dtype(torch.bfloat16):
        transformer = FluxTransformer2DModel.from_config(
            {**bundled_config("transformer_dev"), "num_layers": blocks[0], "num_single_layers": blocks[1]}
        )
        vae = AutoencoderKL.from_config(bundled_config("ae"))
        clip = CLIPTextModel(CLIPTextConfig(**clean_config(bundled_config("clip_l"))))
        t5_config = {**clean_config(bundled_config("t5xxl")), "num_layers": BENCH_T5_LAYERS, "vocab_size": 1000}
        t5 = T5EncoderModel(T5Config(**t5_config))
    comps.denoiser, comps.vae, comps.text_encoders = transformer.eval(), vae.eval(), [clip.eval(), t5.eval()]
    return comps
