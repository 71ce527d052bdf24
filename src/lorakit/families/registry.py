"""The list of model families. Adding a family is one line here plus its folder."""

from __future__ import annotations

from typing import Any

from lorakit.errors import ConfigError
from lorakit.families.base import ModelFamily


def _sd() -> ModelFamily:
    from lorakit.families.sd.family import StableDiffusionFamily

    return StableDiffusionFamily()


def _sdxl() -> ModelFamily:
    from lorakit.families.sdxl.family import StableDiffusionXLFamily

    return StableDiffusionXLFamily()


def _flux() -> ModelFamily:
    from lorakit.families.flux.family import FluxFamily

    return FluxFamily()


def _sd3() -> ModelFamily:
    from lorakit.families.sd3.family import StableDiffusion3Family

    return StableDiffusion3Family()


FAMILIES = {"sd": _sd, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux}


def resolve_family(cfg: Any) -> ModelFamily:
    """The family named by --family, or detected from the checkpoint's keys or folder layout."""
    name = getattr(cfg, "family", "auto")
    if name == "auto":
        name = detect_family(getattr(cfg, "pretrained_model_name_or_path", None))
    if name not in FAMILIES:
        raise ConfigError([f"--family {name}: not supported yet (available: {', '.join(sorted(FAMILIES))})"])
    return FAMILIES[name]()


def detect_family(path: str | None) -> str:
    """The family of a checkpoint, read from its header or folder layout only (cheap, safe for --dry_run)."""
    from lorakit.families.flux.loading import is_flux_source
    from lorakit.families.sd3.detect import is_sd3_checkpoint
    from lorakit.families.sdxl.detect import is_sdxl_checkpoint

    if path and is_sd3_checkpoint(path):  # checked first: `joint_blocks` appears in no other family
        return "sd3"
    if path and is_flux_source(path):
        return "flux"
    if path and is_sdxl_checkpoint(path):
        return "sdxl"
    return "sd"
