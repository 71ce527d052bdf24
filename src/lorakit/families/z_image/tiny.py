"""Tiny Z-Image models of the real architecture (random weights) and writers for both file layouts.

A ZImageTransformer2DModel of width 32 with 2 main blocks and 1 refiner of each kind (head width 16 = RoPE axes
4+6+6; its timestep embedding is 256 wide, as the real one), FLUX.1's autoencoder shape at 4 levels (64 px ->
8x8 latents) and a 2-layer Qwen3 over lorakit's tiny Qwen tokenizer (with a reduced Qwen3 chat template).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from lorakit.checkpoint_io import write_safetensors_atomic
from lorakit.families.base import Components
from lorakit.families.common.ldm_keys import vae_to_ldm
from lorakit.families.common.tiny_parts import (
    TINY_QWEN3_CHAT_TEMPLATE,
    tiny_qwen_tokenizer,
)
from lorakit.families.z_image.loading import flow_scheduler
from lorakit.families.z_image.model_files import configs_metadata, save_transformer_file

TEXT_WIDTH = 32


def build_tiny_z_image(seed: int = 0, *, layers: int = 2) -> Components:
    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer(TINY_QWEN3_CHAT_TEMPLATE)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=layers, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=TEXT_WIDTH, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64],
    )
    with torch.no_grad():  # the real pad tokens are trained values; zeros would hide a mix-up of the two
        transformer.x_pad_token.normal_(), transformer.cap_pad_token.normal_()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16,
        sample_size=64, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    )
    ids = tokenizer.convert_tokens_to_ids
    encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
        pad_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), bos_token_id=None,
    ))
    return Components(transformer.eval(), vae.eval(), [encoder.eval()], [tokenizer], {})


def pipeline_of(comps: Components):
    from diffusers import ZImagePipeline

    return ZImagePipeline(scheduler=flow_scheduler(), vae=comps.vae, text_encoder=comps.text_encoders[0],
                          tokenizer=comps.tokenizers[0], transformer=comps.denoiser)


def save_pipeline_folder(comps: Components, folder: str | Path) -> Path:
    pipeline_of(comps).save_pretrained(str(folder))
    return Path(folder)


def save_single_files(comps: Components, folder: str | Path) -> dict[str, Path]:
    """z_image.safetensors (ComfyUI's layout), qwen3.safetensors (Qwen3ForCausalLM's `model.*` names, as ComfyUI's
    `qwen_3_4b.safetensors`) with the tokenizer beside it, and ae.safetensors (original LDM layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / f"{name}.safetensors" for name in ("z_image", "qwen3", "ae")}
    save_transformer_file(comps.denoiser, files["z_image"])
    encoder = comps.text_encoders[0]
    write_safetensors_atomic({f"model.{k}": v for k, v in encoder.state_dict().items()}, files["qwen3"],
                             configs_metadata("text_encoder", encoder.config.to_dict()))
    write_safetensors_atomic(vae_to_ldm(comps.vae.state_dict(), dict(comps.vae.config), prefix=""), files["ae"],
                             configs_metadata("vae", comps.vae.config))
    comps.tokenizers[0].save_pretrained(str(folder / "tokenizer"))
    return files


def bench_files(size: str, folder: Path, blocks: tuple[int, ...] | None = None) -> tuple[list[str], list[str]]:
    """The `lorakit train` options naming the tiny model's single files (written on first use), and notes.
    Only the tiny size exists yet: Z-Image's real shapes (6B transformer, 4B encoder) need a GPU."""
    if size != "tiny":
        from lorakit.errors import ConfigError

        raise ConfigError([f"--size {size}: only the tiny Z-Image model can be benchmarked yet"])
    files = {name: folder / f"{name}.safetensors" for name in ("z_image", "qwen3", "ae")}
    if not all(path.exists() for path in files.values()):
        save_single_files(build_tiny_z_image(seed=0), folder)
    return [f"--pretrained_model_name_or_path={files['z_image']}", f"--text_encoder={files['qwen3']}",
            f"--vae={files['ae']}"], []
