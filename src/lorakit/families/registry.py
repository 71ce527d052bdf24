"""The list of model families. Adding a family is one line here plus its folder."""

from __future__ import annotations

from typing import Any

from lorakit.errors import ConfigError
from lorakit.families.base import ModelFamily


def _sd() -> ModelFamily:
    from lorakit.families.sd.family import StableDiffusionFamily

    return StableDiffusionFamily()


FAMILIES = {"sd": _sd}


def resolve_family(cfg: Any) -> ModelFamily:
    """The family named by --family, or detected from the options (SD 1.x/2.x is the only one so far)."""
    name = getattr(cfg, "family", "auto")
    if name == "auto":
        name = "sd"
    if name not in FAMILIES:
        raise ConfigError([f"--family {name}: not supported yet (available: {', '.join(sorted(FAMILIES))})"])
    return FAMILIES[name]()
