"""Load Qwen-Image (and Qwen-Image-Edit) offline: a diffusers folder, or the single files the community
distributes (ComfyUI's layout, which musubi-tuner takes too).

A diffusers folder (`model_index.json` with transformer/, vae/, text_encoder/, tokenizer/ and, for Edit,
processor/) holds everything. Single files: the transformer with `--pretrained_model_name_or_path`
(`qwen_image_bf16.safetensors`: diffusers' names, bare or under `model.diffusion_model.`), the Qwen2.5-VL text
encoder with `--text_encoder` (`qwen_2.5_vl_7b.safetensors`: transformers' names of before 4.52, `model.*` and
`visual.*`) and the VAE with `--vae` (`qwen_image_vae.safetensors`: Wan-VAE names, or diffusers'). The Qwen
tokenizer files (and, for Edit, `preprocessor_config.json`) are looked for beside the text-encoder file.

Architectures come from the `lorakit.configs` metadata lorakit writes into its own files (so tiny test models
load), else from the real configs bundled in `configs/`. Modules are built on the meta device and the file's
tensors assigned into them. Nothing reaches a hub.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights

from lorakit.checkpoint_io import read_checkpoint
from lorakit.errors import CheckpointError
from lorakit.families.base import Components
from lorakit.families.common.module_io import (
    assign_weights,
    embedded_config,
    from_pretrained,
    read_json,
    reject_checkpoint,
)
from lorakit.families.common.qwen_tokenizers import (
    find_beside,
    qwen_image_processor_in,
    qwen_tokenizer_in,
)
from lorakit.families.qwen_image.detect import (
    keys_are_qwen_image,
    pipeline_is_edit,
    strip_prefix,
)

_PACKAGE = resources.files("lorakit") / "families" / "qwen_image"
MISSING_TOKENIZER = ("no Qwen tokenizer found: put the Qwen2.5-VL tokenizer files (tokenizer.json or vocab.json + "
                     "merges.txt, tokenizer_config.json; the tokenizer/ folder of the Qwen-Image diffusers repository) "
                     "next to the --text_encoder file or in a tokenizer/ folder beside it")
MISSING_PROCESSOR = ("no image processor found: Qwen-Image-Edit also needs Qwen2.5-VL's preprocessor_config.json (the "
                     "processor/ folder of the Qwen-Image-Edit diffusers repository) next to the --text_encoder file or "
                     "in a processor/ folder beside it")


def bundled_config(name: str) -> dict[str, Any]:
    """One of the bundled real configs: transformer, vae, text_encoder (Qwen2.5-VL 7B)."""
    return json.loads((_PACKAGE / "configs" / f"{name}.json").read_text(encoding="utf-8"))


def flow_scheduler():
    """Qwen-Image's sampling scheduler: Euler on the flow, exponential shift growing with the token count."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )


def load_qwen_image_components(path: str, *, text_encoder: str | None = None, vae: str | None = None,
                               dtype: torch.dtype = torch.float32, edit: bool | None = None,
                               text_encoders: bool = True) -> Components:
    """transformer, VAE, Qwen2.5-VL and its tokenizer (and image processor for Edit) from a diffusers folder or
    single files; every problem names the file (and the option to fix). Without `text_encoders` no encoder and
    no tokenizer is built (every caption's outputs are cached)."""
    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"{path}: Qwen-Image model file or folder not found (--pretrained_model_name_or_path)")
    for flag, value in (("--text_encoder", text_encoder), ("--vae", vae)):
        if value is not None and not Path(value).exists():
            raise CheckpointError(f"{value}: file not found ({flag})")
    is_pipeline = source.is_dir() and (source / "model_index.json").is_file()
    edit = pipeline_is_edit(source) if edit is None and is_pipeline else bool(edit)
    skip_encoder = bool(text_encoder) or not text_encoders
    parts = _pipeline_parts(source, dtype, edit, skip_encoder, vae) if is_pipeline else {"transformer": _transformer(source, dtype)}
    if text_encoder and text_encoders:
        parts.update(load_text_encoder_file(Path(text_encoder), dtype, edit))
    if vae:
        parts["vae"] = load_vae_file(Path(vae), dtype)
    needed = (("--text_encoder", "text_encoder"), ("--vae", "vae")) if text_encoders else (("--vae", "vae"),)
    missing = [flag for flag, key in needed if key not in parts]
    if missing:
        raise CheckpointError(f"{path}: a Qwen-Image transformer file holds only the transformer; also pass "
                              f"{' and '.join(missing)} (as with musubi-tuner), or pass a diffusers Qwen-Image folder")
    extras = {"source": str(path), "edit": edit, "image_processor": parts.get("image_processor")}
    encoders, tokenizers = ([parts["text_encoder"].eval()], [parts["tokenizer"]]) if text_encoders else ([], [])
    return Components(parts["transformer"].eval(), parts["vae"].eval(), encoders, tokenizers, extras)


def _transformer(source: Path, dtype: torch.dtype):
    from diffusers import QwenImageTransformer2DModel

    if source.is_dir():
        sub = "transformer" if (source / "transformer" / "config.json").is_file() else ""
        return from_pretrained(QwenImageTransformer2DModel, source, sub, what="Qwen-Image transformer", torch_dtype=dtype)
    return load_transformer_file(source, dtype)


def _pipeline_parts(folder: Path, dtype: torch.dtype, edit: bool, skip_encoder: bool, vae: str | None) -> dict[str, Any]:
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLForConditionalGeneration

    pipeline = read_json(folder / "model_index.json").get("_class_name", "")
    if not pipeline.startswith("QwenImage"):
        raise CheckpointError(f"{folder}: this is a {pipeline or 'non-Qwen-Image'} model folder, not Qwen-Image; choose its family")
    parts: dict[str, Any] = {"transformer": _transformer(folder, dtype)}
    if not vae:
        parts["vae"] = from_pretrained(AutoencoderKLQwenImage, folder, "vae", what="Qwen-Image VAE", torch_dtype=dtype)
    if not skip_encoder:
        parts["text_encoder"] = from_pretrained(Qwen2_5_VLForConditionalGeneration, folder, "text_encoder", dtype=dtype)
        parts["tokenizer"] = qwen_tokenizer_in(folder / "tokenizer")
        if parts["tokenizer"] is None:
            raise CheckpointError(f"{folder / 'tokenizer'}: {MISSING_TOKENIZER}")
        if edit:
            parts["image_processor"] = qwen_image_processor_in(folder / "processor")
            if parts["image_processor"] is None:
                raise CheckpointError(f"{folder / 'processor'}: {MISSING_PROCESSOR}")
    return parts


def load_transformer_file(file: Path, dtype: torch.dtype):
    """The transformer from a single file of diffusers' names (ComfyUI's `qwen_image_bf16.safetensors`)."""
    from diffusers import QwenImageTransformer2DModel

    checkpoint = read_checkpoint(file)
    if not keys_are_qwen_image(list(checkpoint.state_dict)):
        reject_checkpoint(checkpoint, "qwen_image", "expected a Qwen-Image transformer (txt_norm, img_in, transformer_blocks.*)")
    weights = {strip_prefix(k): v for k, v in checkpoint.state_dict.items()}
    config = embedded_config(checkpoint, "transformer") or _real_transformer_config(weights)
    with init_empty_weights():
        model = QwenImageTransformer2DModel.from_config(config)
    assign_weights(model, weights, file=str(file), component="Qwen-Image transformer", dtype=dtype)
    return model


def _real_transformer_config(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    layers = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("transformer_blocks."))
    return {**bundled_config("transformer"), "num_layers": layers}


# ---------------------------------------------------------------------------------------------------------
# Text encoder and VAE files
# ---------------------------------------------------------------------------------------------------------

_OLD_TRANSFORMERS_NAMES = ((re.compile(r"^visual\."), "model.visual."),
                           (re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model."))


def load_text_encoder_file(file: Path, dtype: torch.dtype, edit: bool) -> dict[str, Any]:
    """Qwen2.5-VL from `qwen_2.5_vl_7b.safetensors` (names of transformers before 4.52 or after), with the
    tokenizer (and for Edit the image processor) found beside it."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    checkpoint = read_checkpoint(file)
    weights = {_new_name(k): v for k, v in checkpoint.state_dict.items()}
    if not any(k.startswith("model.language_model.layers.") for k in weights):
        raise CheckpointError(f"{file}: not a Qwen2.5-VL text encoder (no model.layers.* weights) (--text_encoder)")
    config = Qwen2_5_VLConfig.from_dict(embedded_config(checkpoint, "text_encoder") or bundled_config("text_encoder"))
    with init_empty_weights():
        model = Qwen2_5_VLForConditionalGeneration(config)
    if "lm_head.weight" not in weights:  # unused for conditioning, and left out of some files
        weights["lm_head.weight"] = torch.zeros(model.lm_head.weight.shape, dtype=dtype)
    assign_weights(model, weights, file=str(file), component="Qwen2.5-VL text encoder", dtype=dtype, extra_ok=True)
    parts = {"text_encoder": model, "tokenizer": find_beside(file, qwen_tokenizer_in, MISSING_TOKENIZER)}
    if edit:
        parts["image_processor"] = find_beside(file, qwen_image_processor_in, MISSING_PROCESSOR)
    return parts


def _new_name(key: str) -> str:
    for pattern, replacement in _OLD_TRANSFORMERS_NAMES:
        key = pattern.sub(replacement, key)
    return key


def load_vae_file(file: Path, dtype: torch.dtype):
    """The Qwen-Image VAE from `qwen_image_vae.safetensors` (the Wan-VAE layout ComfyUI ships, read through
    diffusers' own converter) or from a file of diffusers' names."""
    from diffusers import AutoencoderKLQwenImage

    checkpoint = read_checkpoint(file)
    state = dict(checkpoint.state_dict)
    if "encoder.conv1.weight" in state:
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        state = convert_wan_vae_to_diffusers(state)
    elif "encoder.conv_in.weight" not in state:
        raise CheckpointError(f"{file}: not a Qwen-Image VAE (no encoder.conv1 / encoder.conv_in weights) (--vae)")
    config = embedded_config(checkpoint, "vae") or bundled_config("vae")
    with init_empty_weights():
        model = AutoencoderKLQwenImage.from_config(config)
    assign_weights(model, state, file=str(file), component="Qwen-Image VAE", dtype=dtype)
    return model
