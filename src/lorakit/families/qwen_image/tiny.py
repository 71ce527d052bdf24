"""Tiny Qwen-Image models of the real architecture (random weights) and writers for both file layouts.

A QwenImageTransformer2DModel with 2 blocks (head width 16 = RoPE axes 4+6+6), the Qwen-Image VAE at two levels
(64 px -> 8x8 latents: the real one has three downsamplings, so 8× as well), a Qwen2.5-VL with 2 text layers and
1 vision block over lorakit's tiny Qwen tokenizer. `save_pipeline_folder` writes a diffusers folder (QwenImage or
QwenImageEdit pipeline); `save_single_files` writes what musubi-tuner and ComfyUI take (transformer, text encoder
with its tokenizer and image processor beside it, VAE), each with its architecture in the `lorakit.configs` metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from lorakit.checkpoint_io import write_safetensors_atomic
from lorakit.families.base import Components
from lorakit.families.common.tiny_parts import (
    tiny_qwen_image_processor,
    tiny_qwen_tokenizer,
)
from lorakit.families.qwen_image.loading import flow_scheduler
from lorakit.families.qwen_image.model_files import (
    configs_metadata,
    save_transformer_file,
)

TEXT_WIDTH = 32


def tiny_vl_config(tokenizer) -> Qwen2_5_VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, bos_token_id=None,
                         eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_WIDTH,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[0]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )


def build_tiny_qwen_image(seed: int = 0, *, edit: bool = False, layers: int = 2) -> Components:
    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=layers, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH, axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                                 temperal_downsample=[False, True, True])
    encoder = Qwen2_5_VLForConditionalGeneration(tiny_vl_config(tokenizer))
    extras = {"edit": edit, "image_processor": tiny_qwen_image_processor() if edit else None}
    return Components(transformer.eval(), vae.eval(), [encoder.eval()], [tokenizer], extras)


def pipeline_of(comps: Components):
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    from lorakit.families.qwen_image.prompts import VLInputs

    parts = dict(scheduler=flow_scheduler(), vae=comps.vae, text_encoder=comps.text_encoders[0],
                 tokenizer=comps.tokenizers[0], transformer=comps.denoiser)
    if comps.extras.get("edit"):
        return QwenImageEditPipeline(processor=VLInputs(comps.tokenizers[0], comps.extras["image_processor"]), **parts)
    return QwenImagePipeline(**parts)


def save_pipeline_folder(comps: Components, folder: str | Path) -> Path:
    """A diffusers folder; for Edit the image processor goes to processor/ (written by hand: transformers'
    processor class needs torchvision)."""
    from diffusers import QwenImagePipeline

    folder = Path(folder)
    QwenImagePipeline(scheduler=flow_scheduler(), vae=comps.vae, text_encoder=comps.text_encoders[0],
                      tokenizer=comps.tokenizers[0], transformer=comps.denoiser).save_pretrained(str(folder))
    if comps.extras.get("edit"):
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = "QwenImageEditPipeline"
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
        comps.extras["image_processor"].save_pretrained(str(folder / "processor"))
        comps.tokenizers[0].save_pretrained(str(folder / "processor"))
    return folder


def save_single_files(comps: Components, folder: str | Path) -> dict[str, Path]:
    """transformer.safetensors, text_encoder.safetensors (old transformers names, as ComfyUI's file) with the
    tokenizer and image processor beside it, and vae.safetensors (diffusers' names)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / f"{name}.safetensors" for name in ("transformer", "text_encoder", "vae")}
    save_transformer_file(comps.denoiser, files["transformer"])
    encoder = comps.text_encoders[0]
    state = {_old_name(k): v for k, v in encoder.state_dict().items() if k != "lm_head.weight"}
    write_safetensors_atomic(state, files["text_encoder"], configs_metadata("text_encoder", encoder.config.to_dict()))
    write_safetensors_atomic(comps.vae.state_dict(), files["vae"], configs_metadata("vae", comps.vae.config))
    comps.tokenizers[0].save_pretrained(str(folder / "tokenizer"))
    (comps.extras.get("image_processor") or tiny_qwen_image_processor()).save_pretrained(str(folder / "processor"))
    return files


def _old_name(key: str) -> str:
    return key.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)


def bench_files(size: str, folder: Path, blocks: tuple[int, ...] | None = None) -> tuple[list[str], list[str]]:
    """The `lorakit train` options naming the tiny model's single files (written on first use), and notes.
    Only the tiny size exists yet: Qwen-Image's real shapes (20B transformer, 7B encoder) need a GPU."""
    if size != "tiny":
        from lorakit.errors import ConfigError

        raise ConfigError([f"--size {size}: only the tiny Qwen-Image model can be benchmarked yet"])
    files = {name: folder / f"{name}.safetensors" for name in ("transformer", "text_encoder", "vae")}
    if not all(path.exists() for path in files.values()):
        save_single_files(build_tiny_qwen_image(seed=0), folder)
    return [f"--pretrained_model_name_or_path={files['transformer']}", f"--text_encoder={files['text_encoder']}",
            f"--vae={files['vae']}"], []
