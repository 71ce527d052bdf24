"""What the families' ControlNets share for `lorakit generate`: checking a ControlNet file or folder from its header
before anything loads, and the inputs of diffusers' ControlNet pipelines.

gen_img.py's `--control_net_ratios` guides the first steps: step i (counted from 0 over the steps the pipeline
denoises) uses the ControlNet while i / steps <= ratio. diffusers' pipelines keep a ControlNet at step i while
(i + 1) / steps <= control_guidance_end, so the end given is the middle of the first step left out: the same steps,
with no rounding at the border.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.atomic import staged_folder
from lorakit.errors import CheckpointError
from lorakit.families.common.headers import class_name, safetensors_keys

#: key fragments that tell the ControlNet files lorakit and sd-scripts write apart -> what the file is
_KNOWN_LAYOUTS = (
    ("lllite_unet_", "an SDXL ControlNet-LLLite file (give it with --control_net_lllite_models to an SDXL model)"),
    ("controlnet_blocks_for_single.", "a FLUX.1 ControlNet file (give it to a FLUX.1 model)"),
    ("pos_embed_input.", "a FLUX.1 ControlNet file (give it to a FLUX.1 model)"),
    ("zero_convs.", "an SD 1.x/2.x ControlNet file (give it with --control_net_models to an SD 1.x/2.x model)"),
)


def controlnet_file_problems(path: str, folder_class: str, required: tuple[str, ...], what: str) -> list[str]:
    """A diffusers folder must hold a `folder_class` config; a .safetensors file must hold every `required` key
    (sd-scripts' `control_model.` prefix allowed). Other files are checked when they load."""
    source = Path(path)
    if source.is_dir():
        found = class_name(source / "config.json")
        if found != folder_class:
            return [f"{path}: not a diffusers {folder_class} folder (config.json's _class_name is {found or 'missing'})"]
        return []
    keys = safetensors_keys(source)
    if keys is None:
        return []
    names = {key.removeprefix("control_model.") for key in keys}
    if all(key in names for key in required):
        return []
    other = known_layout(names)
    return [f"{path}: not {what}" + (f"; it is {other}" if other else "")]


def known_layout(keys: Any) -> str | None:
    """What a file with these tensor names is, among the ControlNet layouts lorakit writes (None: none of them)."""
    return next((text for fragment, text in _KNOWN_LAYOUTS if any(fragment in key for key in keys)), None)


def guidance_end(kept_steps: int, denoising_steps: int) -> float:
    """diffusers' `control_guidance_end` that keeps a ControlNet for the first `kept_steps` steps (module docstring)."""
    if kept_steps >= denoising_steps:
        return 1.0
    return (kept_steps + 0.5) / denoising_steps


def diffusers_control_inputs(image_key: str, images: list[list[Any]], multipliers: list[float], kept_steps: list[int],
                             denoising_steps: int, *, per_image: bool = False) -> dict[str, Any]:
    """A diffusers ControlNet pipeline's inputs: one ControlNet takes its values, several take lists (one each);
    `per_image`: the pipeline reads several ControlNets' images nested per image of the batch, not per ControlNet."""
    ends = [guidance_end(kept, denoising_steps) for kept in kept_steps]
    if len(images) == 1:
        return {image_key: images[0], "controlnet_conditioning_scale": multipliers[0], "control_guidance_end": ends[0]}
    nested = [list(of_image) for of_image in zip(*images)] if per_image else images
    return {image_key: nested, "controlnet_conditioning_scale": multipliers, "control_guidance_end": ends}


class DiffusersControlNet:
    """What the ControlNets built on diffusers' ControlNet classes share (SD 1.x/2.x, FLUX.1): the option checks
    every one makes, the folder written beside the file, and how a module is placed to train or to generate."""

    def option_problems(self, cfg: Any) -> list[str]:
        problems = []
        if cfg.lllite:
            problems.append("--lllite: ControlNet-LLLite is for SDXL models; this model takes a ControlNet")
        source = cfg.controlnet_model_name_or_path
        if source and not Path(source).exists():
            problems.append(f"--controlnet_model_name_or_path {source} does not exist")
        return problems

    def save_folder(self, module: nn.Module, folder: Path) -> bool:
        with staged_folder(folder) as staging:
            module.save_pretrained(staging, safe_serialization=True)
        return True


def _placed(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    # a cast only where needed: diffusers warns about every `.to(dtype)`
    return module.to(device) if module.dtype == dtype else module.to(device=device, dtype=dtype)


def place_for_training(module: nn.Module, comps: Any, device: torch.device) -> nn.Module:
    """The trained ControlNet: float32 weights on `device`, attached to the model's parts for its forward."""
    module = _placed(module, device, torch.float32)
    module.requires_grad_(True)
    comps.extras["controlnet"] = module
    return module


def place_for_generation(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    return _placed(module, device, dtype).eval().requires_grad_(False)


def misfit_error(path: str, exc: Exception) -> CheckpointError:
    """A ControlNet file whose weights do not fit the model's ControlNet, named with the first of the reasons."""
    return CheckpointError(f"{path} does not fit this model's ControlNet (different layers or sizes): "
                           f"{' '.join(str(exc).split())[:300]}")
