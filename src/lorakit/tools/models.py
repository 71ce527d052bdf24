"""Loading and saving whole base models for the tools that need one (merge into a model, extract).

Every family reads its own layouts (original single files or diffusers folders) and writes the model back in the
layout the output path asks for: a name ending in `.safetensors`/`.ckpt` gives one original-layout file, any
other name a diffusers folder, so a `--save_to` that mirrors the input keeps its layout. Parts a family keeps in
files of their own (`ModelFamily.separate_parts`) come from and go to those files. Every writer stages the
output and moves it into place, so a failure never leaves a half-written model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit.errors import CheckpointError, ConfigError
from lorakit.families.base import Components, ModelFamily, ModelSource
from lorakit.families.registry import get_family

__all__ = ["ModelOutput", "check_model_output", "load_base_model", "save_base_model", "save_part_files"]

SINGLE_FILE_SUFFIXES = {".safetensors": "safetensors", ".ckpt": "ckpt"}


def load_base_model(
    path: str,
    *,
    family: str | ModelFamily,
    v2: bool = False,
    v_parameterization: bool | None = None,
    dtype: torch.dtype = torch.float32,
    files: dict[str, str] | None = None,
) -> Components:
    """A base model from a diffusers folder or a single file, on the CPU in `dtype`.

    Parts a tool does not need may be missing (None): a single file without text encoders, or a denoiser file
    whose encoders were not given in `files`. fp8 (e4m3fn) weights are read and upcast to `dtype`.
    """
    model_family = get_family(family) if isinstance(family, str) else family
    v_param = v2 if v_parameterization is None else v_parameterization  # sd-scripts: default = v2
    source = ModelSource(path, {k: v for k, v in (files or {}).items() if v}, dtype, v2=v2,
                         v_parameterization=bool(v_param), partial=True)
    return model_family.load_model(source)


class ModelOutput:
    """Where and how a merged model is written: `kind` is `folder`, `safetensors` or `ckpt`."""

    def __init__(self, path: Path, kind: str):
        self.path = path
        self.kind = kind


def check_model_output(save_to: str, source: str, option: str = "--sd_model", *, save_option: str = "--save_to",
                       family: ModelFamily | None = None) -> ModelOutput:
    """Decide the output layout from `save_to` and check it can be written, before any model is loaded."""
    path = Path(save_to)
    if path.resolve() == Path(source).resolve():
        raise ConfigError([f"{save_option} {save_to}: refusing to overwrite the input model {option} {source}"])
    if not path.parent.is_dir():
        raise ConfigError([f"{save_option} {save_to}: the folder {path.parent} does not exist"])
    kind = SINGLE_FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None and path.suffix.lower() in (".pt", ".pth", ".bin"):
        raise ConfigError([f"{save_option} {save_to}: a merged model is saved as .safetensors, .ckpt or a diffusers folder"])
    if kind is None and path.exists() and not path.is_dir():
        raise ConfigError([f"{save_option} {save_to}: exists and is not a folder"])
    if kind is not None and family is not None and kind not in family.single_file_kinds:
        suffixes = " or ".join(f".{k}" for k in family.single_file_kinds)
        raise ConfigError([f"{save_option} {save_to}: {family.title} models are saved as {suffixes} or a diffusers folder"])
    return ModelOutput(path, kind or "folder")


def _cast(components: Components, save_dtype: torch.dtype | None) -> None:
    if save_dtype is None:
        return
    for module in (components.denoiser, components.vae, *components.text_encoders):
        if module is not None:
            module.to(save_dtype)


def save_base_model(components: Components, output: ModelOutput, save_dtype: torch.dtype | None, family: ModelFamily) -> None:
    """Write the model (cast to `save_dtype` first when given) as a single file or a diffusers folder."""
    _cast(components, save_dtype)
    try:
        if output.kind == "folder":
            family.save_folder(components, output.path)
        else:
            family.save_single_file(components, output.path, output.kind)
    except OSError as exc:
        raise CheckpointError(f"{output.path}: cannot write the merged model ({exc.strerror or exc})") from exc


def save_part_files(components: Components, family: ModelFamily, outputs: dict[str, str], save_dtype: torch.dtype | None) -> None:
    """The parts read from files of their own (e.g. a text encoder), each back into its own output file."""
    for part, path in outputs.items():
        try:
            family.save_part_file(components, part, Path(path), save_dtype)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot write the merged {part} ({exc.strerror or exc})") from exc
