"""Load Z-Image offline: a diffusers folder, or the single files the community distributes (ComfyUI's layout,
which musubi-tuner takes too).

A diffusers folder (`model_index.json` of ZImagePipeline with transformer/, vae/, text_encoder/, tokenizer/) holds
everything. Single files: the transformer with `--pretrained_model_name_or_path` (`z_image_turbo_bf16.safetensors`:
ComfyUI's fused-qkv layout, or diffusers' names), the Qwen3 text encoder with `--text_encoder`
(`qwen_3_4b.safetensors`: `model.*` names of Qwen3ForCausalLM) with the Qwen3 tokenizer files beside it, and the
autoencoder with `--vae` (`ae.safetensors`, FLUX.1's autoencoder in the original or diffusers layout).

Architectures come from the `lorakit.configs` metadata lorakit writes into its own files, else from the real
configs bundled in `configs/`. Nothing reaches a hub.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights

from lorakit.checkpoint_io import read_checkpoint
from lorakit.errors import CheckpointError
from lorakit.families.base import Components
from lorakit.families.common.ldm_keys import ldm_to_vae
from lorakit.families.common.module_io import (
    assign_weights,
    embedded_config,
    from_pretrained,
    read_json,
    reject_checkpoint,
)
from lorakit.families.common.qwen_tokenizers import find_beside, qwen_tokenizer_in
from lorakit.families.z_image.comfy_keys import (
    comfy_to_diffusers,
    is_comfy_layout,
    strip_prefix,
)

_PACKAGE = resources.files("lorakit") / "families" / "z_image"
MISSING_TOKENIZER = ("no Qwen3 tokenizer found: put the Qwen3 tokenizer files (tokenizer.json, tokenizer_config.json "
                     "with its chat template; the tokenizer/ folder of the Z-Image diffusers repository) next to the "
                     "--text_encoder file or in a tokenizer/ folder beside it")


def bundled_config(name: str) -> dict[str, Any]:
    """One of the bundled real configs: transformer, vae (FLUX.1's autoencoder), text_encoder (Qwen3-4B)."""
    return json.loads((_PACKAGE / "configs" / f"{name}.json").read_text(encoding="utf-8"))


def flow_scheduler():
    """Z-Image's sampling scheduler: Euler on the flow with shift 3 (the pipeline adds no resolution shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def load_z_image_components(path: str, *, text_encoder: str | None = None, vae: str | None = None,
                            dtype: torch.dtype = torch.float32, text_encoders: bool = True) -> Components:
    """transformer, autoencoder, Qwen3 and its tokenizer from a diffusers folder or single files. Without
    `text_encoders` no encoder and no tokenizer is built (every caption's outputs are cached)."""
    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"{path}: Z-Image model file or folder not found (--pretrained_model_name_or_path)")
    for flag, value in (("--text_encoder", text_encoder), ("--vae", vae)):
        if value is not None and not Path(value).exists():
            raise CheckpointError(f"{value}: file not found ({flag})")
    if source.is_dir() and (source / "model_index.json").is_file():
        parts = _pipeline_parts(source, dtype, bool(text_encoder) or not text_encoders, vae)
    else:
        parts = {"transformer": load_transformer(source, dtype)}
    if text_encoder and text_encoders:
        parts["text_encoder"] = load_text_encoder_file(Path(text_encoder), dtype)
        parts["tokenizer"] = find_beside(Path(text_encoder), qwen_tokenizer_in, MISSING_TOKENIZER)
    if vae:
        parts["vae"] = load_vae_file(Path(vae), dtype)
    needed = (("--text_encoder", "text_encoder"), ("--vae", "vae")) if text_encoders else (("--vae", "vae"),)
    missing = [flag for flag, key in needed if key not in parts]
    if missing:
        raise CheckpointError(f"{path}: a Z-Image transformer file holds only the transformer; also pass "
                              f"{' and '.join(missing)} (as with musubi-tuner), or pass a diffusers Z-Image folder")
    encoders, tokenizers = ([parts["text_encoder"].eval()], [parts["tokenizer"]]) if text_encoders else ([], [])
    return Components(parts["transformer"].eval(), parts["vae"].eval(), encoders, tokenizers, {"source": str(path)})


def _pipeline_parts(folder: Path, dtype: torch.dtype, skip_encoder: bool, vae: str | None) -> dict[str, Any]:
    from diffusers import AutoencoderKL
    from transformers import Qwen3Model

    pipeline = read_json(folder / "model_index.json").get("_class_name", "")
    if pipeline != "ZImagePipeline":
        raise CheckpointError(f"{folder}: this is a {pipeline or 'non-Z-Image'} model folder, not Z-Image; choose its family")
    parts: dict[str, Any] = {"transformer": load_transformer(folder, dtype)}
    if not vae:
        parts["vae"] = from_pretrained(AutoencoderKL, folder, "vae", what="Z-Image autoencoder", torch_dtype=dtype)
    if not skip_encoder:
        parts["text_encoder"] = from_pretrained(Qwen3Model, folder, "text_encoder", what="Qwen3 text encoder", dtype=dtype)
        parts["tokenizer"] = qwen_tokenizer_in(folder / "tokenizer")
        if parts["tokenizer"] is None:
            raise CheckpointError(f"{folder / 'tokenizer'}: {MISSING_TOKENIZER}")
    return parts


def load_transformer(source: Path, dtype: torch.dtype):
    """The transformer of a diffusers folder (or its transformer/), or of a single file in either layout."""
    from diffusers import ZImageTransformer2DModel

    if source.is_dir():
        sub = "transformer" if (source / "transformer" / "config.json").is_file() else ""
        if not (source / sub / "config.json").is_file():
            raise CheckpointError(f"{source}: not a diffusers Z-Image transformer folder (no config.json, no transformer/config.json)")
        return from_pretrained(ZImageTransformer2DModel, source, sub, what="Z-Image transformer", torch_dtype=dtype)
    checkpoint = read_checkpoint(source)
    keys = list(checkpoint.state_dict)
    if not any(strip_prefix(k).startswith("noise_refiner.") for k in keys):
        reject_checkpoint(checkpoint, "z_image", "expected a Z-Image transformer (noise_refiner.*, context_refiner.*, layers.*)")
    state = checkpoint.state_dict
    weights = comfy_to_diffusers(state) if is_comfy_layout(keys) else {strip_prefix(k): v for k, v in state.items()}
    config = embedded_config(checkpoint, "transformer") or _real_config(weights)
    with init_empty_weights():
        model = ZImageTransformer2DModel.from_config(config)
    assign_weights(model, weights, file=str(source), component="Z-Image transformer", dtype=dtype)
    return model


def _real_config(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    layers = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("layers."))
    return {**bundled_config("transformer"), "n_layers": layers}


def load_text_encoder_file(file: Path, dtype: torch.dtype):
    """Qwen3 from `qwen_3_4b.safetensors` (Qwen3ForCausalLM's `model.*` names, or Qwen3Model's own); the
    language-model head is not needed."""
    from transformers import Qwen3Config, Qwen3Model

    checkpoint = read_checkpoint(file)
    weights = {k.removeprefix("model."): v for k, v in checkpoint.state_dict.items() if not k.startswith("lm_head.")}
    if not any(k.startswith("layers.") for k in weights):
        raise CheckpointError(f"{file}: not a Qwen3 text encoder (no model.layers.* weights) (--text_encoder)")
    config = Qwen3Config.from_dict(embedded_config(checkpoint, "text_encoder") or bundled_config("text_encoder"))
    with init_empty_weights():
        model = Qwen3Model(config)
    assign_weights(model, weights, file=str(file), component="Qwen3 text encoder", dtype=dtype)
    return model


def load_vae_file(file: Path, dtype: torch.dtype):
    """The autoencoder from `ae.safetensors` (FLUX.1's, original LDM layout) or a file of diffusers' names."""
    from diffusers import AutoencoderKL

    checkpoint = read_checkpoint(file)
    config = embedded_config(checkpoint, "vae") or bundled_config("vae")
    state = checkpoint.state_dict
    if any(k.startswith("encoder.down.") for k in state):
        state = ldm_to_vae(state, config)
    elif not any(k.startswith("encoder.down_blocks.") for k in state):
        raise CheckpointError(f"{file}: not an autoencoder (no encoder.down.* weights) (--vae)")
    with init_empty_weights():
        model = AutoencoderKL.from_config(config)
    assign_weights(model, state, file=str(file), component="Z-Image autoencoder", dtype=dtype)
    return model
