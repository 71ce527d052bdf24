"""The list of model families: the one place that names them all. Adding a family is one line in `FAMILIES`.

Entries are import paths, so reading the list (for `--family` choices, say) imports no model code. The order is
the order of detection: the first family whose `owns_checkpoint` accepts a file wins, and the last one is what a
checkpoint nobody claims is taken for (SD 1.x/2.x files have no marker of their own).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable, Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

from lorakit.errors import ConfigError

if TYPE_CHECKING:  # the list is read by the option parser, which should not import model code
    from lorakit.families.base import ModelFamily

FAMILIES: dict[str, str] = {
    "sd3": "lorakit.families.sd3.family:StableDiffusion3Family",
    "flux2": "lorakit.families.flux2.family:Flux2Family",  # before FLUX.1, whose version prefix `flux` starts its own
    "flux": "lorakit.families.flux.family:FluxFamily",
    "chroma": "lorakit.families.chroma.family:ChromaFamily",
    "qwen_image": "lorakit.families.qwen_image.family:QwenImageFamily",
    "z_image": "lorakit.families.z_image.family:ZImageFamily",
    "sdxl": "lorakit.families.sdxl.family:StableDiffusionXLFamily",
    "sd": "lorakit.families.sd.family:StableDiffusionFamily",
}


def family_names() -> tuple[str, ...]:
    """Every family's `--family` name, in detection order."""
    return tuple(FAMILIES)


def _package(name: str) -> str:
    return FAMILIES[name].partition(":")[0].rpartition(".")[0]


def family_option_sections() -> tuple[type, ...]:
    """The option sections the families add to `lorakit train` (`families/<name>/options.py: OPTIONS`), each once."""
    sections: list[type] = []
    for name in FAMILIES:
        module = f"{_package(name)}.options"
        if importlib.util.find_spec(module) is not None:
            section = importlib.import_module(module).OPTIONS
            if section not in sections:
                sections.append(section)
    return tuple(sections)


@cache
def family_class(name: str) -> "type[ModelFamily]":
    """The class of the family `name` (imported on first use)."""
    if name not in FAMILIES:
        raise ConfigError([f"--family {name}: not supported yet (available: {', '.join(sorted(FAMILIES))})"])
    module, _, attribute = FAMILIES[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def get_family(name: str) -> "ModelFamily":
    """A fresh family object (families keep per-run state such as a text-encoder cache)."""
    return family_class(name)()


def all_families() -> "list[ModelFamily]":
    return [get_family(name) for name in FAMILIES]


def fixtures(name: str) -> Any:
    """The family's tiny-model builders (`families/<name>/tiny.py`), for tests, the demo and benchmarks only."""
    return importlib.import_module(f"{_package(name)}.tiny")


def resolve_family(cfg: Any) -> "ModelFamily":
    """The family named by --family, or detected from the checkpoint's keys or folder layout."""
    name = getattr(cfg, "family", "auto")
    if name == "auto":
        name = detect_family(getattr(cfg, "pretrained_model_name_or_path", None))
    return get_family(name)


def detect_family(path: str | None) -> str:
    """The family of a checkpoint, read from its header or folder layout only (cheap, safe for --dry_run)."""
    names = family_names()
    if path:
        for name in names[:-1]:
            if get_family(name).owns_checkpoint(path):
                return name
    return names[-1]


def guess_lora_family(module_names: Iterable[str], metadata: Mapping[str, str] | None = None) -> str | None:
    """The family of a LoRA file from its metadata (`ss_base_model_version`, `modelspec.architecture`), else
    from its module names; None when nothing matches."""
    metadata = metadata or {}
    families = all_families()
    version = metadata.get("ss_base_model_version", "")
    for family in families:
        if version and version.startswith(family.version_prefixes):
            return family.name
    architecture = metadata.get("modelspec.architecture", "")
    for family in families:
        if architecture and any(fragment in architecture for fragment in family.architecture_fragments):
            return family.name
    names = list(module_names)
    hints = sorted((hint.priority, family.name, hint.fragments) for family in families for hint in family.lora_hints)
    for _, name, fragments in hints:
        if any(n.startswith(fragment) or f".{fragment}" in n for n in names for fragment in fragments):
            return name
    return None


def family_title(name: str | None) -> str:
    """The family's name for messages (`SDXL`), or the given text when it is no family."""
    return family_class(name).title if name in FAMILIES else str(name)


def describe_lora_names(module_names: list[str]) -> str | None:
    """The title of the family whose LoRA files use these module names (None when they say nothing)."""
    name = guess_lora_family(module_names)
    return family_title(name) if name else None
