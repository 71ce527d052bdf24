"""Load SDXL base models offline: diffusers folders (StableDiffusionXLPipeline layout) and SGM single files.

Nothing here reaches a model hub. Single files are converted with diffusers' converters called with an
explicit config: the `lorakit.configs` metadata lorakit writes into its own files (so tiny test models load),
or else the real SDXL base configs bundled in `configs/sdxl_base/`. Modules are built on the meta device and
the checkpoint's tensors assigned into them, so loading holds one copy of the weights. The module-building
and weight-placing helpers are shared with the other families (`families/common/module_io.py`).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lorakit.checkpoint_io import LoadedCheckpoint, read_checkpoint
from lorakit.errors import CheckpointError
from lorakit.families.base import Components
from lorakit.families.common import ldm_keys
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
from lorakit.families.sdxl import sgm_keys
from lorakit.families.sdxl.detect import keys_are_sdxl
from lorakit.families.sdxl.sgm_keys import CONFIG_NAMES, TE1_PREFIX, TE2_PREFIX

_CONFIG_DIR = resources.files("lorakit") / "families" / "sdxl" / "configs" / "sdxl_base"
_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")
_BUNDLED_HINT = " The file was read as the real SDXL base architecture."


def bundled_config(component: str) -> dict[str, Any]:
    """One bundled SDXL base config: `unet`, `vae`, `text_encoder`, `text_encoder_2` or `scheduler`."""
    return json.loads((_CONFIG_DIR / f"{component}.json").read_text(encoding="utf-8"))


def noise_scheduler_config(v_parameterization: bool) -> dict[str, Any]:
    """SDXL's training schedule (scaled_linear, as SD 1.x); v_prediction iff --v_parameterization."""
    config = bundled_config("scheduler")
    config["prediction_type"] = "v_prediction" if v_parameterization else "epsilon"
    return config


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------


def load_sdxl_components(
    path: str, *, v_parameterization: bool = False, vae_path: str | None = None, dtype: torch.dtype = torch.float32,
    text_encoders: bool = True,
) -> Components:
    """Load SDXL from a diffusers folder or a single SGM-layout `.safetensors`/`.ckpt` file.

    `vae_path` replaces the VAE (`--vae`). Without `text_encoders` neither encoder nor tokenizer is built (their
    outputs are cached). Every problem with the user's files raises `CheckpointError` naming the file.
    """
    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"{path}: model file or folder not found")
    if vae_path is not None and not Path(vae_path).exists():
        raise CheckpointError(f"{vae_path}: VAE file or folder not found")  # before spending time on the model
    if source.is_dir():
        unet, vae, encoders, tokenizers = _load_diffusers_folder(source, dtype, text_encoders)
    else:
        unet, vae, encoders = _load_single_file(source, dtype, text_encoders)
        tokenizers = [bundled_clip_tokenizer(CLIP_PAD_END), bundled_clip_tokenizer(CLIP_PAD_OPENCLIP)] if text_encoders else []
    if vae_path is not None:
        vae = load_vae(vae_path, dict(vae.config), dtype=dtype)
    extras = {
        "noise_scheduler_config": noise_scheduler_config(v_parameterization),
        "prediction_type": "v_prediction" if v_parameterization else "epsilon",
        "source": str(path),
    }
    return Components(unet, vae, encoders, tokenizers, extras)


# ---------------------------------------------------------------------------------------------------------
# Diffusers folders
# ---------------------------------------------------------------------------------------------------------


def _load_diffusers_folder(folder: Path, dtype: torch.dtype, text_encoders: bool = True):
    """unet/, vae/, text_encoder/, text_encoder_2/ from local files; tokenizer folders if present, else bundled."""
    _check_diffusers_folder(folder)
    unet = from_pretrained(UNet2DConditionModel, folder, "unet", torch_dtype=dtype)
    vae = from_pretrained(AutoencoderKL, folder, "vae", torch_dtype=dtype)
    if not text_encoders:
        return unet.eval(), vae.eval(), [], []
    te1 = from_pretrained(CLIPTextModel, folder, "text_encoder", dtype=dtype)
    te2 = from_pretrained(CLIPTextModelWithProjection, folder, "text_encoder_2", dtype=dtype)
    tokenizers = [
        folder_clip_tokenizer(folder / sub) if (folder / sub).is_dir() else bundled_clip_tokenizer(pad)
        for sub, pad in (("tokenizer", CLIP_PAD_END), ("tokenizer_2", CLIP_PAD_OPENCLIP))
    ]
    return unet.eval(), vae.eval(), [te1.eval(), te2.eval()], tokenizers


def _check_diffusers_folder(folder: Path) -> None:
    """Refuse folders that are not SDXL pipelines before loading any weight."""
    index_file = folder / "model_index.json"
    if not index_file.is_file() and not (folder / "unet").is_dir():
        raise CheckpointError(
            f"{folder}: not a diffusers model folder (expected model_index.json with unet/, vae/, text_encoder/ "
            "and text_encoder_2/ subfolders), nor a .safetensors/.ckpt file"
        )
    if index_file.is_file():
        pipeline = read_json(index_file).get("_class_name", "")
        if pipeline and "XL" not in pipeline:
            raise CheckpointError(f"{folder}: this is a {pipeline} model, not SDXL; {_family_hint(pipeline)}")
    for sub in _SUBFOLDERS:
        if not (folder / sub / "config.json").is_file():
            hint = " (an SD 1.x/2.x folder? use --family sd)" if sub == "text_encoder_2" else ""
            raise CheckpointError(f"{folder}: the diffusers folder has no {sub}/config.json{hint}")
    unet_config = read_json(folder / "unet" / "config.json")
    if unet_config.get("addition_embed_type") != "text_time":
        raise CheckpointError(f"{folder}: unet/config.json is not an SDXL UNet (no text_time addition embedding)")


def _family_hint(pipeline: str) -> str:
    if "StableDiffusion3" in pipeline:
        return "use --family sd3"
    if "Flux" in pipeline:
        return "use --family flux"
    return "use --family sd" if pipeline.startswith("StableDiffusion") else "choose its family"


# ---------------------------------------------------------------------------------------------------------
# Single files
# ---------------------------------------------------------------------------------------------------------


def _load_single_file(file: Path, dtype: torch.dtype, text_encoders: bool = True):
    """An SGM-layout checkpoint -> (unet, vae, [te1, te2] or []), converted with an explicit config."""
    checkpoint = read_checkpoint(file)
    _check_is_sdxl_checkpoint(checkpoint)
    configs = embedded_configs(checkpoint, CONFIG_NAMES) or {name: bundled_config(name) for name in CONFIG_NAMES}
    modules = _empty_modules(configs, text_encoders)
    weights = checkpoint.state_dict
    converted = {
        "unet": sgm_keys.sgm_to_unet(weights, configs["unet"]),
        "vae": ldm_keys.ldm_to_vae(weights, configs["vae"]),
    }
    if text_encoders:
        converted["text_encoder"] = sgm_keys.sgm_to_te1(weights)
        converted["text_encoder_2"] = sgm_keys.sgm_to_te2(weights, modules[3])
    del weights, checkpoint  # the converted dicts hold the only references to the tensors now
    hint = "" if configs.get("_embedded") else _BUNDLED_HINT
    for name, module in zip(CONFIG_NAMES, modules):
        assign_weights(
            module, converted.pop(name), file=str(file), component=name, dtype=dtype, hint=hint, extra_ok=True,
            fit_unit_dims=True,
        )
    unet, vae, *encoders = (module.eval() for module in modules)
    return unet, vae, encoders


def _empty_modules(configs: dict[str, Any], text_encoders: bool = True) -> list:
    """UNet, VAE and both text encoders (unless not wanted) with parameters on the meta device: allocating them
    costs nothing."""
    with init_empty_weights(), skip_weight_init():
        modules = [UNet2DConditionModel.from_config(configs["unet"]), AutoencoderKL.from_config(configs["vae"])]
        if text_encoders:
            modules += [CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])),
                        CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"]))]
    return modules


# ---------------------------------------------------------------------------------------------------------
# Recognising what a file is
# ---------------------------------------------------------------------------------------------------------

_EXPECTED = (
    "expected an SDXL checkpoint in the original SGM layout (model.diffusion_model.*, first_stage_model.*, "
    "conditioner.embedders.0.transformer.*, conditioner.embedders.1.model.*) or a diffusers SDXL folder"
)

def _check_is_sdxl_checkpoint(checkpoint: LoadedCheckpoint) -> None:
    keys = list(checkpoint.state_dict)
    if keys_are_sdxl(keys):
        missing = [p for p in (TE1_PREFIX, TE2_PREFIX, ldm_keys.VAE_PREFIX) if not any(k.startswith(p) for k in keys)]
        if missing:
            raise CheckpointError(
                f"{checkpoint.path}: an SDXL UNet without {', '.join(p + '*' for p in missing)}; lorakit needs the "
                "full checkpoint (UNet, VAE and both text encoders)"
            )
        return
    reject_checkpoint(checkpoint, "sdxl", _EXPECTED)
