"""Load Stable Diffusion 1.x/2.x base models offline: diffusers folders and original single-file checkpoints.

Nothing here reaches a model hub. Single files are converted with diffusers' converters called with an explicit
config: the `lorakit.configs` metadata lorakit writes into its own files (so tiny test models load too), or
else the real architecture configs bundled in `configs/`, chosen as sd-scripts does from `--v2` and
`--v_parameterization`. Modules are created on the meta device and the checkpoint's tensors are assigned into
them, so loading holds one copy of the weights, not two.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from lorakit.checkpoint_io import LoadedCheckpoint, read_checkpoint
from lorakit.errors import CheckpointError
from lorakit.families.base import Components
from lorakit.families.common import ldm_keys
from lorakit.families.common.ldm_keys import (
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    UNET_PREFIX,
)
from lorakit.families.common.module_io import (
    assign_weights,
    embedded_configs,
    from_pretrained,
    read_json,
    reject_checkpoint,
    skip_weight_init,
)
from lorakit.families.common.tokenizers import (
    CLIP_PAD_END,
    CLIP_PAD_OPENCLIP,
    bundled_clip_tokenizer,
    folder_clip_tokenizer,
)
from lorakit.families.common.vae_files import load_vae

_CONFIG_DIR = resources.files("lorakit") / "families" / "sd" / "configs"
_VERSION_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x"}
# Real text-encoder widths, used to tell SD 1.x (CLIP-L, 768) from SD 2.x (OpenCLIP-H, 1024) by shape.
_CROSS_ATTENTION_WIDTH = {768: "sd1", 1024: "sd2"}
CONFIG_NAMES = ("unet", "vae", "text_encoder")


# ---------------------------------------------------------------------------------------------------------
# Bundled configs
# ---------------------------------------------------------------------------------------------------------


def bundled_variant(v2: bool, v_parameterization: bool) -> str:
    """The bundled config folder for the flags: SD 1.5, SD 2.x-base (512) or SD 2.x-v (768)."""
    if not v2:
        return "sd15"
    return "sd2_v" if v_parameterization else "sd2_base"


def bundled_config(variant: str, component: str) -> dict[str, Any]:
    """One bundled diffusers/transformers config (`unet`, `vae`, `text_encoder` or `scheduler`)."""
    return json.loads((_CONFIG_DIR / variant / f"{component}.json").read_text(encoding="utf-8"))


def noise_scheduler_config(v2: bool, v_parameterization: bool) -> dict[str, Any]:
    """The DDPM training schedule, with prediction_type = v_prediction iff v_parameterization (as sd-scripts)."""
    config = bundled_config(bundled_variant(v2, v_parameterization), "scheduler")
    config["prediction_type"] = "v_prediction" if v_parameterization else "epsilon"
    return config


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------


def load_sd_components(
    path: str,
    *,
    v2: bool,
    v_parameterization: bool,
    vae_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    text_encoders: bool = True,
) -> Components:
    """Load an SD 1.x/2.x model from a diffusers folder or a single `.safetensors`/`.ckpt` file.

    `v2` selects SD 2.x (OpenCLIP text encoder) as sd-scripts' `--v2` does; `v_parameterization` selects the
    v-prediction objective. `vae_path` replaces the VAE (`--vae`). Without `text_encoders` the text encoder and
    its tokenizer are not built (their outputs are cached). Every problem with the user's files raises
    `CheckpointError` naming the file.
    """
    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"{path}: model file or folder not found")
    if vae_path is not None and not Path(vae_path).exists():
        raise CheckpointError(f"{vae_path}: VAE file or folder not found")  # before spending time on the model
    version = "sd2" if v2 else "sd1"
    if source.is_dir():
        unet, vae, text_encoder, tokenizer = _load_diffusers_folder(source, version, dtype, text_encoders)
    else:
        unet, vae, text_encoder = _load_single_file(source, version, v_parameterization, dtype, text_encoders)
        tokenizer = bundled_clip_tokenizer(CLIP_PAD_OPENCLIP if v2 else CLIP_PAD_END) if text_encoders else None
    if vae_path is not None:
        vae = load_vae(vae_path, dict(vae.config), dtype=dtype)
    extras = {
        "noise_scheduler_config": noise_scheduler_config(v2, v_parameterization),
        "prediction_type": "v_prediction" if v_parameterization else "epsilon",
        "version": version,
        "source": str(path),
    }
    return Components(unet, vae, [text_encoder] if text_encoders else [], [tokenizer] if text_encoders else [], extras)


# ---------------------------------------------------------------------------------------------------------
# Diffusers folders
# ---------------------------------------------------------------------------------------------------------


def _load_diffusers_folder(folder: Path, version: str, dtype: torch.dtype, text_encoders: bool = True):
    """unet/, vae/, text_encoder/ via from_pretrained on local files; tokenizer/ if present, else bundled."""
    _check_diffusers_folder(folder, version)
    unet = from_pretrained(UNet2DConditionModel, folder, "unet", torch_dtype=dtype)
    vae = from_pretrained(AutoencoderKL, folder, "vae", torch_dtype=dtype)
    if not text_encoders:
        return unet.eval(), vae.eval(), None, None
    text_encoder = from_pretrained(CLIPTextModel, folder, "text_encoder", dtype=dtype)
    if (folder / "tokenizer").is_dir():
        tokenizer = folder_clip_tokenizer(folder / "tokenizer")
    else:
        tokenizer = bundled_clip_tokenizer(CLIP_PAD_OPENCLIP if version == "sd2" else CLIP_PAD_END)
    return unet.eval(), vae.eval(), text_encoder.eval(), tokenizer


def _check_diffusers_folder(folder: Path, version: str) -> None:
    """Refuse folders that are not SD 1.x/2.x pipelines before loading any weight."""
    index_file = folder / "model_index.json"
    if not index_file.is_file() and not (folder / "unet").is_dir():
        raise CheckpointError(
            f"{folder}: not a diffusers model folder (expected model_index.json with unet/, vae/ and "
            "text_encoder/ subfolders), nor a .safetensors/.ckpt file"
        )
    if index_file.is_file():
        pipeline = read_json(index_file).get("_class_name", "")
        if "XL" in pipeline or "StableDiffusion3" in pipeline or "Flux" in pipeline:
            raise CheckpointError(f"{folder}: this is a {pipeline} model, not SD 1.x/2.x; choose its family")
    for sub in ("unet", "vae", "text_encoder"):
        if not (folder / sub / "config.json").is_file():
            raise CheckpointError(f"{folder}: the diffusers folder has no {sub}/config.json")
    width = read_json(folder / "unet" / "config.json").get("cross_attention_dim")
    _check_version(str(folder), version, _CROSS_ATTENTION_WIDTH.get(width))


# ---------------------------------------------------------------------------------------------------------
# Single files
# ---------------------------------------------------------------------------------------------------------


def _load_single_file(file: Path, version: str, v_parameterization: bool, dtype: torch.dtype, text_encoders: bool = True):
    """An original-layout (LDM) checkpoint -> (unet, vae, text_encoder or None), converted with an explicit config."""
    checkpoint = read_checkpoint(file)
    _check_is_sd_checkpoint(checkpoint)
    _check_version(str(file), version, _detect_version(checkpoint.state_dict))
    configs = embedded_configs(checkpoint, CONFIG_NAMES) or _bundled_configs(version == "sd2", v_parameterization)
    unet, vae, text_encoder = _empty_modules(configs, text_encoders)
    weights = checkpoint.state_dict
    converted = {
        "unet": ldm_keys.ldm_to_unet(weights, configs["unet"]),
        "vae": ldm_keys.ldm_to_vae(weights, configs["vae"]),
    }
    if text_encoders:
        converted["text_encoder"] = (
            ldm_keys.openclip_to_clip(weights, text_encoder) if version == "sd2" else ldm_keys.ldm_to_clip(weights)
        )
    del weights, checkpoint  # the converted dicts hold the only references to the tensors now
    hint = "" if configs.get("_embedded") else _bundled_hint(version)
    modules = (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
    for name, module in modules[: 3 if text_encoders else 2]:
        assign_weights(
            module, converted.pop(name), file=str(file), component=name, dtype=dtype, hint=hint, extra_ok=True,
            fit_unit_dims=True,
        )
    return unet.eval(), vae.eval(), text_encoder.eval() if text_encoders else None


def _bundled_configs(v2: bool, v_parameterization: bool) -> dict[str, Any]:
    variant = bundled_variant(v2, v_parameterization)
    return {name: bundled_config(variant, name) for name in CONFIG_NAMES}


def _bundled_hint(version: str) -> str:
    """Appended to shape errors when the real bundled architecture was assumed: the --v2 flag may be wrong."""
    other = "sd1" if version == "sd2" else "sd2"
    flag = "remove --v2" if version == "sd2" else "add --v2"
    return (
        f" The file was read as the real {_VERSION_NAMES[version]} architecture; if it is an "
        f"{_VERSION_NAMES[other]} model, {flag}."
    )


def _empty_modules(configs: dict[str, Any], text_encoders: bool = True) -> tuple[nn.Module, nn.Module, nn.Module | None]:
    """UNet, VAE and text encoder with parameters on the meta device: allocating them costs nothing."""
    with init_empty_weights(), skip_weight_init():
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])) if text_encoders else None
    return unet, vae, text_encoder


# ---------------------------------------------------------------------------------------------------------
# Recognising what a file is
# ---------------------------------------------------------------------------------------------------------


def _detect_version(state_dict: dict[str, torch.Tensor]) -> str | None:
    """sd1/sd2 from the text encoder's layout, else from the real cross-attention width; None if unknown."""
    if any(k.startswith(SD2_TEXT_PREFIX) for k in state_dict):
        return "sd2"
    if any(k.startswith(SD1_TEXT_PREFIX) for k in state_dict):
        return "sd1"
    probe = state_dict.get(f"{UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    return None if probe is None else _CROSS_ATTENTION_WIDTH.get(int(probe.shape[-1]))


def _check_version(name: str, wanted: str, found: str | None) -> None:
    if found is None or found == wanted:
        return
    flag = "add --v2" if found == "sd2" else "remove --v2"
    raise CheckpointError(
        f"{name}: this looks like an {_VERSION_NAMES[found]} checkpoint, but it was loaded as "
        f"{_VERSION_NAMES[wanted]}: {flag}"
    )


def _check_is_sd_checkpoint(checkpoint: LoadedCheckpoint) -> None:
    keys = list(checkpoint.state_dict)
    if any(k.startswith(UNET_PREFIX) for k in keys) and not any(k.startswith("conditioner.") for k in keys):
        return
    expected = (
        "expected a Stable Diffusion 1.x/2.x checkpoint in the original layout (model.diffusion_model.*, "
        "first_stage_model.*, cond_stage_model.*) or a diffusers model folder"
    )
    reject_checkpoint(checkpoint, "sd", expected)
