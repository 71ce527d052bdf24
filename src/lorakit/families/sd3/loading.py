"""Load SD3 / SD3.5 offline: SAI single files (text encoders and VAE inside or not), diffusers folders, overrides.

sd-scripts' `sd3_train_network.py` takes one `.safetensors` in Stability AI's layout: the MMDiT under
`model.diffusion_model.`, the VAE under `first_stage_model.` (LDM layout) and, in the "incl_clips(_t5xxl)"
releases, the text encoders under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.` (transformers layout).
Whatever the file lacks comes from `--clip_l`, `--clip_g`, `--t5xxl` and `--vae`, which also replace what it
has. A diffusers folder (StableDiffusion3Pipeline layout) works the same way.

Architectures come from the `lorakit.configs` metadata lorakit writes into its own files (tiny test models),
else the transformer's is read off its tensor shapes and the others are the real ones bundled in `configs/`.
Tokenizers: CLIP's BPE ships with lorakit; the T5 tokenizer is read from the folder (`tokenizer_3/`) or from
beside the checkpoint or the `--t5xxl` file. Nothing reaches a model hub.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, SD3Transformer2DModel
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from lorakit.checkpoint_io import LoadedCheckpoint, read_checkpoint
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
from lorakit.families.common.tokenizers import (
    CLIP_PAD_END,
    CLIP_PAD_OPENCLIP,
    bundled_clip_tokenizer,
    find_t5_tokenizer,
    t5_tokenizer_in,
)
from lorakit.families.sd3 import sai_keys

_PACKAGE = resources.files("lorakit") / "families" / "sd3"
TEXT_ENCODERS = ("clip_l", "clip_g", "t5xxl")
T5_TOKENIZER_DIRS = ("", "tokenizer_3", "t5_tokenizer", "tokenizer_2")
_NEEDED_BY = "SD3"


def bundled_config(name: str) -> dict[str, Any]:
    """A bundled real config: vae, clip_l, clip_g, t5xxl, or `<variant>/transformer` (sd3-medium, …)."""
    return json.loads((_PACKAGE / "configs" / f"{name}.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------


def load_sd3_components(
    path: str, *, clip_l: str | None = None, clip_g: str | None = None, t5xxl: str | None = None,
    vae: str | None = None, dtype: torch.dtype = torch.float32, text_encoders: bool = True,
    tokenizer_cache_dir: str | None = None,
) -> Components:
    """MMDiT, VAE, [CLIP-L, CLIP-G, T5-XXL] and their tokenizers; every problem names the file and the flag.

    Without `text_encoders` no encoder and no tokenizer is built (their outputs are cached), and none is required.
    """
    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"{path}: SD3 model file or folder not found (--pretrained_model_name_or_path)")
    overrides = {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5xxl, "vae": vae}
    for name, value in overrides.items():
        if value is not None and not Path(value).exists():
            raise CheckpointError(f"{value}: file or folder not found (--{name})")
    skip = {k for k, v in overrides.items() if v} | (set() if text_encoders else set(TEXT_ENCODERS))
    if source.is_dir():
        parts = _load_pipeline_folder(source, dtype, skip=skip)
    else:
        parts = _load_single_file(source, dtype, skip=skip)
    for name in TEXT_ENCODERS if text_encoders else ():
        if overrides[name]:
            parts[name] = load_text_encoder_file(Path(overrides[name]), name, dtype)
    if vae:
        parts["vae"] = load_vae_source(Path(vae), dtype)
    needed = (*TEXT_ENCODERS, "vae") if text_encoders else ("vae",)
    missing = [f"--{name}" for name in needed if name not in parts]
    if missing:
        raise CheckpointError(
            f"{path}: this SD3 checkpoint does not contain {', '.join(m[2:] for m in missing)}; pass "
            f"{', '.join(missing)} (as with sd-scripts' sd3_train_network.py)"
        )
    transformer = parts["transformer"].eval()
    encoders, tokenizers = [], []
    if text_encoders:
        if "t5_tokenizer" not in parts:
            parts["t5_tokenizer"] = find_t5_tokenizer([Path(t5xxl)] if t5xxl else [source], T5_TOKENIZER_DIRS, _NEEDED_BY,
                                                      tokenizer_cache_dir)
        encoders = [parts[name].eval() for name in TEXT_ENCODERS]
        tokenizers = [bundled_clip_tokenizer(CLIP_PAD_END), bundled_clip_tokenizer(CLIP_PAD_OPENCLIP), parts["t5_tokenizer"]]
    extras = {"source": str(path), "model_type": sai_keys.model_type(dict(transformer.config))}
    return Components(transformer, parts["vae"].eval(), encoders, tokenizers, extras)


# ---------------------------------------------------------------------------------------------------------
# Diffusers folders
# ---------------------------------------------------------------------------------------------------------

_FOLDER_PARTS = {  # name -> (class, subfolder, kwargs key for the dtype)
    "vae": (AutoencoderKL, "vae", "torch_dtype"),
    "clip_l": (CLIPTextModelWithProjection, "text_encoder", "dtype"),
    "clip_g": (CLIPTextModelWithProjection, "text_encoder_2", "dtype"),
    "t5xxl": (T5EncoderModel, "text_encoder_3", "dtype"),
}


def _load_pipeline_folder(folder: Path, dtype: torch.dtype, skip: set[str]) -> dict[str, Any]:
    index = folder / "model_index.json"
    if not index.is_file():
        if (folder / "config.json").is_file():
            return {"transformer": _from_pretrained(SD3Transformer2DModel, folder, "", "torch_dtype", dtype)}
        raise CheckpointError(f"{folder}: not a diffusers SD3 folder (no model_index.json)")
    pipeline = read_json(index).get("_class_name", "")
    if "StableDiffusion3" not in pipeline:
        raise CheckpointError(f"{folder}: this is a {pipeline or 'non-SD3'} folder, not SD3; choose its family with --family")
    parts: dict[str, Any] = {"transformer": _from_pretrained(SD3Transformer2DModel, folder, "transformer", "torch_dtype", dtype)}
    for name, (cls, subfolder, dtype_key) in _FOLDER_PARTS.items():
        if name not in skip and (folder / subfolder).is_dir():
            parts[name] = _from_pretrained(cls, folder, subfolder, dtype_key, dtype)
    if "t5xxl" not in skip:
        tokenizer = t5_tokenizer_in(folder / "tokenizer_3")
        if tokenizer is not None:
            parts["t5_tokenizer"] = tokenizer
    return parts


def _from_pretrained(cls, folder: Path, subfolder: str, dtype_key: str, dtype: torch.dtype) -> nn.Module:
    return from_pretrained(cls, folder, subfolder, what=f"SD3 {subfolder or 'transformer'}", **{dtype_key: dtype})


# ---------------------------------------------------------------------------------------------------------
# Single files
# ---------------------------------------------------------------------------------------------------------


def _load_single_file(file: Path, dtype: torch.dtype, skip: set[str]) -> dict[str, Any]:
    """Split an SAI file into its parts; parts named in `skip` come from flags and are not built."""
    checkpoint = read_checkpoint(file)
    state = checkpoint.state_dict
    if not sai_keys.is_sai_transformer(state):
        reject_checkpoint(checkpoint, "sd3", "expected an SD3 MMDiT (model.diffusion_model.joint_blocks.*)")
    parts: dict[str, Any] = {"transformer": _transformer_from(checkpoint, dtype)}
    if "vae" not in skip and any(k.startswith(sai_keys.VAE_PREFIX) for k in state):
        config = embedded_config(checkpoint, "vae") or bundled_config("vae")
        parts["vae"] = _vae_from_state({k: v for k, v in state.items() if k.startswith(sai_keys.VAE_PREFIX)}, config, file, dtype)
    for name in TEXT_ENCODERS:
        prefix = sai_keys.TE_PREFIXES[name]
        if name not in skip and any(k.startswith(prefix) for k in state):
            weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            parts[name] = _text_encoder_from(weights, name, embedded_config(checkpoint, name), file, dtype)
    return parts


def _transformer_from(checkpoint: LoadedCheckpoint, dtype: torch.dtype) -> SD3Transformer2DModel:
    state = sai_keys.strip_transformer_prefix(checkpoint.state_dict)
    config = embedded_config(checkpoint, "transformer") or sai_keys.transformer_config_from_sai(state, checkpoint.path)
    weights = sai_keys.sai_to_diffusers(state, config, checkpoint.path)
    with init_empty_weights():
        model = SD3Transformer2DModel.from_config(config)
    assign_weights(model, weights, file=checkpoint.path, component="SD3 MMDiT", dtype=dtype)
    return model


def load_text_encoder_file(file: Path, name: str, dtype: torch.dtype) -> nn.Module:
    """CLIP-L, CLIP-G or T5-XXL from its own file (`--clip_l` …), transformers layout, SAI prefix optional."""
    if file.is_dir():
        cls = T5EncoderModel if name == "t5xxl" else CLIPTextModelWithProjection
        return _from_pretrained(cls, file, "", "dtype", dtype)
    checkpoint = read_checkpoint(file)
    prefix = sai_keys.TE_PREFIXES[name]
    weights = {k.removeprefix(prefix): v for k, v in checkpoint.state_dict.items()}
    return _text_encoder_from(weights, name, embedded_config(checkpoint, name), file, dtype)


def _text_encoder_from(weights: dict[str, torch.Tensor], name: str, config: dict | None, file: Path, dtype: torch.dtype) -> nn.Module:
    flag = f"--{name}"
    if name == "t5xxl":
        if not any(k.startswith("encoder.block.") for k in weights):
            raise CheckpointError(f"{file}: not a T5 encoder (no encoder.block.* weights) ({flag})")
        with init_empty_weights():
            model = T5EncoderModel(T5Config.from_dict(config or bundled_config("t5xxl")))
        # the token embedding is shared: files store it as `shared.weight`, `encoder.embed_tokens.weight` or both
        embedding = weights.get("shared.weight", weights.get("encoder.embed_tokens.weight"))
        if embedding is not None:
            weights["shared.weight"] = weights["encoder.embed_tokens.weight"] = embedding
        assign_weights(model, weights, file=str(file), component="T5-XXL", dtype=dtype, extra_ok=True)
        return model
    weights = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in weights.items()}
    if not any(k.startswith("text_model.encoder.layers.") for k in weights):
        raise CheckpointError(f"{file}: not a CLIP text encoder (no encoder.layers.* weights) ({flag})")
    if "text_projection.weight" not in weights:
        raise CheckpointError(f"{file}: this CLIP has no text_projection, which SD3's pooled conditioning needs ({flag})")
    with init_empty_weights():
        model = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config or bundled_config(name)))
    weights.pop("text_model.embeddings.position_ids", None)
    assign_weights(model, weights, file=str(file), component=name.replace("_", "-").upper(), dtype=dtype, extra_ok=True)
    _fill_position_ids(model)
    return model


def _fill_position_ids(model: nn.Module) -> None:
    """CLIP's position ids are a non-persistent buffer; after a meta build they must be made again."""
    embeddings = model.text_model.embeddings
    if getattr(embeddings, "position_ids", None) is not None and embeddings.position_ids.is_meta:
        count = embeddings.position_embedding.weight.shape[0]
        embeddings.register_buffer("position_ids", torch.arange(count).unsqueeze(0), persistent=False)


def load_vae_source(source: Path, dtype: torch.dtype) -> AutoencoderKL:
    """`--vae`: a diffusers VAE folder, or a file in LDM (`first_stage_model.` or bare) or diffusers layout."""
    if source.is_dir():
        return _from_pretrained(AutoencoderKL, source, "vae" if (source / "vae").is_dir() else "", "torch_dtype", dtype)
    checkpoint = read_checkpoint(source)
    config = embedded_config(checkpoint, "vae") or bundled_config("vae")
    return _vae_from_state(checkpoint.state_dict, config, source, dtype)


def _vae_from_state(state: dict[str, torch.Tensor], config: dict[str, Any], file: Path, dtype: torch.dtype) -> AutoencoderKL:
    if any(".down.0." in k or k.startswith("encoder.down.") for k in state):
        weights = ldm_to_vae(state, config)
    elif any(k.startswith("encoder.down_blocks.") for k in state):
        weights = dict(state)
    else:
        raise CheckpointError(f"{file}: not an SD3 VAE (no encoder.down.* weights) (--vae)")
    with init_empty_weights():
        model = AutoencoderKL.from_config(config)
    assign_weights(model, weights, file=str(file), component="VAE", dtype=dtype, extra_ok=True)
    return model


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and helpers
# ---------------------------------------------------------------------------------------------------------
