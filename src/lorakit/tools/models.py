"""Loading and saving whole base models for the tools that need one (merge into a model, extract).

A merged model is written in the layout the output path asks for: a name ending in `.safetensors`/`.ckpt`
gives one original-layout file, any other name a diffusers folder, so `--save_to` that mirrors `--sd_model`
keeps the layout it was read in. Both writers stage the output and move it into place, so a failure never
leaves a half-written model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit.errors import CheckpointError, ConfigError
from lorakit.families.base import Components

__all__ = ["ModelOutput", "check_model_output", "load_base_model", "save_base_model"]

SINGLE_FILE_SUFFIXES = {".safetensors": "safetensors", ".ckpt": "ckpt"}


def load_base_model(
    path: str, *, family: str = "sd", v2: bool = False, v_parameterization: bool | None = None, dtype: torch.dtype = torch.float32
) -> Components:
    """A base model from a diffusers folder or a single file, on the CPU in `dtype`."""
    if family != "sd":
        raise ConfigError([f"the LoRA tools cannot load {family} base models yet"])
    from lorakit.families.sd.loading import load_sd_components

    v_param = v2 if v_parameterization is None else v_parameterization  # sd-scripts: default = v2
    return load_sd_components(path, v2=v2, v_parameterization=v_param, dtype=dtype)


class ModelOutput:
    """Where and how a merged model is written: `kind` is `folder`, `safetensors` or `ckpt`."""

    def __init__(self, path: Path, kind: str):
        self.path = path
        self.kind = kind


def check_model_output(save_to: str, source: str) -> ModelOutput:
    """Decide the output layout from `save_to` and check it can be written, before any model is loaded."""
    path = Path(save_to)
    if path.resolve() == Path(source).resolve():
        raise ConfigError([f"--save_to {save_to}: refusing to overwrite the input model --sd_model {source}"])
    if not path.parent.is_dir():
        raise ConfigError([f"--save_to {save_to}: the folder {path.parent} does not exist"])
    kind = SINGLE_FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None and path.suffix.lower() in (".pt", ".pth", ".bin"):
        raise ConfigError([f"--save_to {save_to}: a merged model is saved as .safetensors, .ckpt or a diffusers folder"])
    if kind is None and path.exists() and not path.is_dir():
        raise ConfigError([f"--save_to {save_to}: exists and is not a folder"])
    return ModelOutput(path, kind or "folder")


def save_base_model(components: Components, output: ModelOutput, save_dtype: torch.dtype | None) -> None:
    """Write the model (cast to `save_dtype` first when given) as a single file or a diffusers folder."""
    if save_dtype is not None:
        for module in (components.denoiser, components.vae, *components.text_encoders):
            module.to(save_dtype)
    try:
        if output.kind == "folder":
            from lorakit.toy.tiny_models import save_sd_diffusers_folder

            save_sd_diffusers_folder(components, output.path)
        else:
            from lorakit.families.sd.ldm_keys import save_sd_single_file

            save_sd_single_file(components, output.path, fmt=output.kind)
    except OSError as exc:
        raise CheckpointError(f"{output.path}: cannot write the merged model ({exc.strerror or exc})") from exc
