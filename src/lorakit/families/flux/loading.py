"""Load FLUX.1 offline: a diffusers folder, or BFL single files as sd-scripts takes them.

sd-scripts' `flux_train_network.py` takes the transformer with `--pretrained_model_name_or_path`
(`flux1-dev.safetensors`, BFL layout, optionally under ComfyUI's `model.diffusion_model.` prefix) and the other
parts as separate files: `--clip_l` (CLIP-L text encoder, transformers layout), `--t5xxl` (T5-XXL encoder) and
`--ae` (the autoencoder, LDM layout). A diffusers folder (`model_index.json` with transformer/, vae/,
text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/) holds everything; the three flags then replace parts.

Architectures come from the `lorakit.configs` metadata lorakit writes into its own files (so tiny test
models load), else from the real configs bundled in `configs/`. Modules are built on the meta device and
the file's tensors assigned into them, so loading holds one copy of the weights. Nothing reaches a hub.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel

from lorakit.checkpoint_io import read_checkpoint
from lorakit.errors import CheckpointError
from lorakit.families.base import Components
from lorakit.families.common.bfl_parts import (
    SHARED_CONFIGS,
    load_ae_file,
    load_t5_file,
    shared_config,
)
from lorakit.families.common.headers import safetensors_keys
from lorakit.families.common.module_io import (
    assign_weights,
    embedded_config,
    from_pretrained,
    read_json,
    reject_checkpoint,
)
from lorakit.families.common.tokenizers import (
    CLIP_PAD_END,
    bundled_clip_tokenizer,
    find_t5_tokenizer,
    folder_clip_tokenizer,
    t5_tokenizer_in,
)
from lorakit.families.flux import bfl_keys

_PACKAGE = resources.files("lorakit") / "families" / "flux"
REAL_AXES_DIMS_ROPE = (16, 56, 56)
T5_TOKENIZER_DIRS = ("", "tokenizer_2", "t5_tokenizer")  # beside the --t5xxl file
_NEEDED_BY = "FLUX.1"


def bundled_config(name: str) -> dict[str, Any]:
    """One of the bundled real configs: transformer_dev, transformer_schnell, ae, clip_l, t5xxl (the last two
    shared with Chroma, in `common/configs/`)."""
    if name in SHARED_CONFIGS:
        return shared_config(name)
    return json.loads((_PACKAGE / "configs" / f"{name}.json").read_text(encoding="utf-8"))


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The sampling scheduler of FLUX.1-dev: Euler on the flow, shift growing with the image token count."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------


def load_flux_components(
    path: str,
    *,
    clip_l: str | None = None,
    t5xxl: str | None = None,
    ae: str | None = None,
    dtype: torch.dtype = torch.float32,
    text_encoders: bool = True,
    tokenizer_cache_dir: str | None = None,
) -> Components:
    """transformer, AE, [CLIP-L, T5-XXL] and their tokenizers from a diffusers folder or BFL single files.

    Without `text_encoders` no encoder and no tokenizer is built (their outputs are cached), and neither
    `--clip_l` nor `--t5xxl` is required. Every problem with the user's files raises `CheckpointError` naming
    the file (and the flag to fix).
    """
    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"{path}: FLUX model file or folder not found (--pretrained_model_name_or_path)")
    for flag, value in (("--clip_l", clip_l), ("--t5xxl", t5xxl), ("--ae", ae)):
        if value is not None and not Path(value).exists():
            raise CheckpointError(f"{value}: file not found ({flag})")
    parts: dict[str, Any] = {}
    if source.is_dir() and (source / "model_index.json").is_file():
        skip = {"clip_l": clip_l or not text_encoders, "t5xxl": t5xxl or not text_encoders, "ae": ae}
        parts = _load_pipeline_folder(source, dtype, skip=skip)
    elif source.is_dir():
        parts["transformer"] = _from_pretrained(FluxTransformer2DModel, source, "", torch_dtype=dtype)
    else:
        parts["transformer"] = load_transformer_file(source, dtype)
    if clip_l and text_encoders:
        parts["clip_l"], parts["clip_tokenizer"] = load_clip_l_file(Path(clip_l), dtype), bundled_clip_tokenizer(CLIP_PAD_END)
    if t5xxl and text_encoders:
        parts["t5xxl"], parts["t5_tokenizer"] = load_t5_file(Path(t5xxl), dtype), find_t5_tokenizer(
            [Path(t5xxl)], T5_TOKENIZER_DIRS, _NEEDED_BY, tokenizer_cache_dir)
    if ae:
        parts["ae"] = load_ae_file(Path(ae), dtype)
    needed = (("--clip_l", "clip_l"), ("--t5xxl", "t5xxl"), ("--ae", "ae")) if text_encoders else (("--ae", "ae"),)
    missing = [flag for flag, key in needed if key not in parts]
    if missing:
        raise CheckpointError(
            f"{path}: a FLUX transformer file holds only the transformer; also pass {', '.join(missing)} "
            "(as with sd-scripts' flux_train_network.py), or pass a diffusers FLUX folder"
        )
    transformer = parts["transformer"].eval()
    extras = {"source": str(path), "schnell": not transformer.config.guidance_embeds}
    if not text_encoders:
        return Components(transformer, parts["ae"].eval(), [], [], extras)
    return Components(
        transformer, parts["ae"].eval(), [parts["clip_l"].eval(), parts["t5xxl"].eval()],
        [parts["clip_tokenizer"], parts["t5_tokenizer"]], extras,
    )


# ---------------------------------------------------------------------------------------------------------
# Diffusers folders
# ---------------------------------------------------------------------------------------------------------


def _load_pipeline_folder(folder: Path, dtype: torch.dtype, skip: dict[str, str | None]) -> dict[str, Any]:
    pipeline = read_json(folder / "model_index.json").get("_class_name", "")
    if "Flux" not in pipeline:
        raise CheckpointError(f"{folder}: this is a {pipeline or 'non-FLUX'} model folder, not FLUX.1; choose its family")
    parts: dict[str, Any] = {"transformer": _from_pretrained(FluxTransformer2DModel, folder, "transformer", torch_dtype=dtype)}
    if not skip["ae"]:
        parts["ae"] = _from_pretrained(AutoencoderKL, folder, "vae", torch_dtype=dtype)
    if not skip["clip_l"]:
        parts["clip_l"] = _from_pretrained(CLIPTextModel, folder, "text_encoder", dtype=dtype)
        tokenizer_dir = folder / "tokenizer"
        parts["clip_tokenizer"] = folder_clip_tokenizer(tokenizer_dir) if tokenizer_dir.is_dir() else bundled_clip_tokenizer()
    if not skip["t5xxl"]:
        parts["t5xxl"] = _from_pretrained(T5EncoderModel, folder, "text_encoder_2", dtype=dtype)
        parts["t5_tokenizer"] = t5_tokenizer_in(folder / "tokenizer_2")
        if parts["t5_tokenizer"] is None:
            raise CheckpointError(f"{folder / 'tokenizer_2'}: no T5 tokenizer in this diffusers folder (tokenizer.json or "
                                  "spiece.model); copy the tokenizer_2/ folder of the FLUX.1 diffusers repository here")
    return parts


def _from_pretrained(cls, folder: Path, subfolder: str, **kwargs) -> nn.Module:
    return from_pretrained(cls, folder, subfolder, what=f"FLUX {subfolder or 'transformer'}", **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Single files
# ---------------------------------------------------------------------------------------------------------


def load_transformer_file(file: Path, dtype: torch.dtype) -> FluxTransformer2DModel:
    """A FLUX transformer from a BFL-layout (or diffusers-layout) single file."""
    checkpoint = read_checkpoint(file)
    state = checkpoint.state_dict
    if bfl_keys.is_bfl_transformer(state):
        config = embedded_config(checkpoint, "transformer") or _real_transformer_config(state, checkpoint.path)
        weights = bfl_keys.bfl_to_diffusers(state, checkpoint.path)
    elif any(k.startswith("transformer_blocks.") for k in state):
        config = embedded_config(checkpoint, "transformer") or _real_transformer_config_from_diffusers(state)
        weights = state
    else:
        reject_checkpoint(checkpoint, "flux", "expected a FLUX.1 transformer (double_blocks.*/single_blocks.*)")
    del state, checkpoint
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    assign_weights(model, weights, file=str(file), component="FLUX transformer", dtype=dtype)
    return model


def _real_transformer_config(state: dict[str, torch.Tensor], path: str) -> dict[str, Any]:
    derived = bfl_keys.transformer_config_from_bfl(state, None)
    if derived["attention_head_dim"] != sum(REAL_AXES_DIMS_ROPE):
        raise CheckpointError(
            f"{path}: a FLUX transformer with head width {derived['attention_head_dim']} (FLUX.1 has 128) and no "
            "lorakit.configs metadata; its rotary-embedding axes cannot be inferred"
        )
    derived["axes_dims_rope"] = list(REAL_AXES_DIMS_ROPE)
    return derived


def _real_transformer_config_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    guidance = "time_text_embed.guidance_embedder.linear_1.weight" in state
    return bundled_config("transformer_dev" if guidance else "transformer_schnell")


def load_clip_l_file(file: Path, dtype: torch.dtype) -> CLIPTextModel:
    """CLIP-L from `clip_l.safetensors` (transformers layout, with or without the `text_model.` level)."""
    checkpoint = read_checkpoint(file)
    config = CLIPTextConfig.from_dict(embedded_config(checkpoint, "clip_l") or bundled_config("clip_l"))
    with init_empty_weights():
        model = CLIPTextModel(config)
    keep_level = hasattr(model, "text_model")  # transformers 5 dropped it; older files still carry it
    weights = {}
    for key, value in checkpoint.state_dict.items():
        key = key.removeprefix("text_encoders.clip_l.transformer.")
        if not keep_level and key.startswith("text_model."):
            key = key[len("text_model.") :]
        weights[key] = value
    if not any(k.startswith(("encoder.layers.", "text_model.encoder.layers.")) for k in weights):
        raise CheckpointError(f"{file}: not a CLIP-L text encoder (no encoder.layers.* weights) (--clip_l)")
    assign_weights(model, weights, file=str(file), component="CLIP-L", dtype=dtype, extra_ok=True)
    return model


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def is_flux_source(path: str) -> bool:
    """Whether `path` is a FLUX.1 model (for family detection): a diffusers folder whose pipeline or transformer
    class is FLUX.1's, or a file with BFL/diffusers FLUX.1 transformer keys (safetensors: only the header is read).

    Chroma and FLUX.2 share the BFL block names, so a file is FLUX.1's only with FLUX.1's own pooled-text embedder
    (`vector_in`, diffusers' `time_text_embed.text_embedder`), which neither of them has."""
    source = Path(path)
    if source.is_dir():
        for file, wanted in ((source / "model_index.json", _FLUX1_PIPELINE), (source / "transformer" / "config.json", _FLUX1_MODEL),
                             (source / "config.json", _FLUX1_MODEL)):
            if file.is_file() and wanted.fullmatch(str(read_json(file).get("_class_name", ""))):
                return True
        return False
    keys = safetensors_keys(source)  # a GGUF file's tensor names too
    if keys is None:  # not a weights file, or an unreadable one: reported by the family that loads it
        return False
    if bfl_keys.is_bfl_transformer(dict.fromkeys(keys)):
        return bfl_keys.has_key(keys, "vector_in.in_layer.weight")
    return any(k.startswith("single_transformer_blocks.") for k in keys) and "time_text_embed.text_embedder.linear_1.weight" in keys


_FLUX1_PIPELINE = re.compile(r"Flux(?!2)\w*Pipeline")  # FluxPipeline, FluxImg2ImgPipeline, ... (not Flux2*)
_FLUX1_MODEL = re.compile(r"FluxTransformer2DModel")
