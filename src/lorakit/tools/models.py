"""Loading and saving whole base models for the tools that need one (merge into a model, extract).

Every family is read with its own loader (SD LDM, SDXL SGM, SD3 SAI, FLUX BFL single files or diffusers
folders) and written back in the layout the output path asks for: a name ending in `.safetensors`/`.ckpt`
gives one original-layout file, any other name a diffusers folder, so a `--save_to` that mirrors the input
keeps its layout. FLUX single files hold the transformer only (`--flux_model`); CLIP-L and T5 come from and go
to their own files. Every writer stages the output and moves it into place, so a failure never leaves a
half-written model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit.errors import CheckpointError, ConfigError
from lorakit.families.base import Components

__all__ = [
    "ModelOutput", "check_model_output", "load_base_model", "load_flux_transformer_folder",
    "save_base_model", "save_module_file",
]

SINGLE_FILE_SUFFIXES = {".safetensors": "safetensors", ".ckpt": "ckpt"}
FAMILIES = ("sd", "sdxl", "sd3", "flux")


def load_base_model(
    path: str,
    *,
    family: str = "sd",
    v2: bool = False,
    v_parameterization: bool | None = None,
    dtype: torch.dtype = torch.float32,
    clip_l: str | None = None,
    t5xxl: str | None = None,
) -> Components:
    """A base model from a diffusers folder or a single file, on the CPU in `dtype`.

    Parts a tool does not need may be missing (None): an SD3 SAI file without encoders, a FLUX transformer
    file without `clip_l`/`t5xxl`. fp8 (e4m3fn) weights are read and upcast to `dtype`.
    """
    if family not in FAMILIES:
        raise ConfigError([f"the LoRA tools do not know the {family} family (available: {', '.join(FAMILIES)})"])
    if family == "sd":
        from lorakit.families.sd.loading import load_sd_components

        v_param = v2 if v_parameterization is None else v_parameterization  # sd-scripts: default = v2
        return load_sd_components(path, v2=v2, v_parameterization=v_param, dtype=dtype)
    if family == "sdxl":
        from lorakit.families.sdxl.loading import load_sdxl_components

        return load_sdxl_components(path, v_parameterization=bool(v_parameterization), dtype=dtype)
    if family == "sd3":
        return _load_sd3(path, dtype)
    return _load_flux(path, clip_l, t5xxl, dtype)


def _load_sd3(path: str, dtype: torch.dtype) -> Components:
    if Path(path).is_dir():
        from lorakit.families.sd3.loading import load_sd3_components

        return load_sd3_components(path, dtype=dtype)
    from lorakit.families.sd3.tools_io import load_sai_parts

    return load_sai_parts(path, dtype)


def _load_flux(path: str, clip_l: str | None, t5xxl: str | None, dtype: torch.dtype) -> Components:
    if Path(path).is_dir():
        from lorakit.families.flux.loading import load_flux_components

        return load_flux_components(path, clip_l=clip_l, t5xxl=t5xxl, dtype=dtype)
    from lorakit.families.flux.tools_io import load_flux_parts

    return load_flux_parts(path, clip_l=clip_l, t5xxl=t5xxl, dtype=dtype)


def load_flux_transformer_folder(path: str, dtype: torch.dtype = torch.float32) -> Components:
    """Only the transformer of a diffusers FLUX folder (the pipeline folder or its `transformer/`)."""
    from diffusers import FluxTransformer2DModel

    from lorakit.families.common.module_io import from_pretrained

    folder = Path(path)
    subfolder = "transformer" if (folder / "transformer" / "config.json").is_file() else ""
    if not (folder / subfolder / "config.json").is_file():
        raise CheckpointError(f"{path}: not a diffusers FLUX transformer folder (no config.json, no transformer/config.json)")
    transformer = from_pretrained(FluxTransformer2DModel, folder, subfolder, what="FLUX transformer", torch_dtype=dtype)
    return Components(transformer.eval(), None, [None, None], [], {"source": path})


class ModelOutput:
    """Where and how a merged model is written: `kind` is `folder`, `safetensors` or `ckpt`."""

    def __init__(self, path: Path, kind: str):
        self.path = path
        self.kind = kind


def check_model_output(save_to: str, source: str, option: str = "--sd_model", *, save_option: str = "--save_to") -> ModelOutput:
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
    return ModelOutput(path, kind or "folder")


def _cast(components: Components, save_dtype: torch.dtype | None) -> None:
    if save_dtype is None:
        return
    for module in (components.denoiser, components.vae, *components.text_encoders):
        if module is not None:
            module.to(save_dtype)


def save_base_model(components: Components, output: ModelOutput, save_dtype: torch.dtype | None, family: str = "sd") -> None:
    """Write the model (cast to `save_dtype` first when given) as a single file or a diffusers folder.

    For FLUX a single file is the transformer alone (BFL layout); its encoders go through `save_module_file`.
    """
    _cast(components, save_dtype)
    try:
        if output.kind == "folder":
            _save_folder(components, output.path, family)
        else:
            _save_single_file(components, output, family)
    except OSError as exc:
        raise CheckpointError(f"{output.path}: cannot write the merged model ({exc.strerror or exc})") from exc


def _save_single_file(components: Components, output: ModelOutput, family: str) -> None:
    if family in ("sd3", "flux") and output.kind != "safetensors":
        raise ConfigError([f"--save_to {output.path}: {family.upper()} models are saved as .safetensors or a diffusers folder"])
    if family == "sd":
        from lorakit.families.sd.ldm_keys import save_sd_single_file

        save_sd_single_file(components, output.path, fmt=output.kind)
    elif family == "sdxl":
        from lorakit.families.sdxl.sgm_keys import save_sdxl_single_file

        save_sdxl_single_file(components, output.path, fmt=output.kind)
    elif family == "sd3":
        from lorakit.families.sd3.tools_io import save_sai_single_file

        save_sai_single_file(components, output.path)
    else:
        from lorakit.families.flux.tools_io import save_transformer_file

        save_transformer_file(components.denoiser, output.path)


def _save_folder(components: Components, path: Path, family: str) -> None:
    if family == "sd":
        from lorakit.toy.tiny_models import save_sd_diffusers_folder

        save_sd_diffusers_folder(components, path)
        return
    if family == "sdxl":
        from lorakit.families.sdxl.tiny import save_sdxl_diffusers_folder

        save_sdxl_diffusers_folder(components, path)
        return
    if any(part is None for part in (components.vae, *components.text_encoders)) or not components.tokenizers:
        raise ConfigError([f"--save_to {path}: a diffusers folder needs the whole pipeline; this {family.upper()} model was read from single files, so save it as .safetensors"])
    from lorakit.families.common.checkpoint_io import save_pipeline_atomic

    if family == "sd3":
        from lorakit.families.sd3.tiny import pipeline_of

        save_pipeline_atomic(pipeline_of(components), path)
    else:
        from lorakit.families.flux.family import FluxFamily

        save_pipeline_atomic(FluxFamily().pipeline(components), path)


def save_module_file(module: torch.nn.Module, path: str | Path, kind: str, save_dtype: torch.dtype | None) -> None:
    """A FLUX text encoder (`clip_l` or `t5xxl`) back into its own file, in the layout it was read in."""
    from lorakit.families.flux.tools_io import save_clip_l_file, save_t5_file

    writer = save_clip_l_file if kind == "clip_l" else save_t5_file
    try:
        writer(module, path, save_dtype)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write the merged {kind} ({exc.strerror or exc})") from exc
