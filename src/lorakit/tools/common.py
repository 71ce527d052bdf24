"""What every LoRA tool shares: precision names, output checks, reading LoRA files and writing them with
fresh metadata and hashes.

Outputs always go through `save_lora_file`, which casts to the save precision before it hashes, so the
`sshs_*` hashes describe the bytes on disk even when the work was done in another precision.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from lorakit.adapters.formats import load_lora_file, save_lora_file
from lorakit.adapters.modelspec import build_modelspec
from lorakit.errors import CheckpointError, ConfigError
from lorakit.families.base import ModelFamily
from lorakit.families.registry import family_title, get_family, guess_lora_family
from lorakit.tools.lora_state import LoraFactors, detect_algorithm, read_modules, to_state_dict

__all__ = [
    "LoadedLora",
    "check_output",
    "load_lora",
    "merged_metadata",
    "parse_precision",
    "require_file",
    "save_lora",
    "uniform_value",
]

PRECISIONS = {
    None: None, "float": torch.float32, "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
LORA_SUFFIXES = {".safetensors": "safetensors", ".ckpt": "ckpt", ".pt": "pt", ".pth": "pt"}
_HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")


def parse_precision(value: str | None, option: str) -> torch.dtype | None:
    """`float`/`fp16`/`bf16` (and their long names) -> dtype; None stays None."""
    if value not in PRECISIONS:
        raise ConfigError([f"{option} {value}: expected one of float, fp16, bf16"])
    return PRECISIONS[value]


def require_file(path: str, option: str) -> None:
    """Refuse an input that does not exist, naming the option that gave it."""
    if not Path(path).exists():
        raise ConfigError([f"{option} {path}: file not found"])


def check_output(path: str | Path, option: str = "--save_to") -> tuple[Path, str]:
    """The output path and its file format, checked before any work is done."""
    path = Path(path)
    fmt = LORA_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError([f"{option} {path}: the file name must end in .safetensors, .ckpt, .pt or .pth"])
    if not path.parent.is_dir():
        raise ConfigError([f"{option} {path}: the folder {path.parent} does not exist"])
    return path, fmt


class LoadedLora:
    """A LoRA file read into modules: `modules` by kohya name, its `metadata`, the `style` of its keys and the
    model `family` it is for."""

    def __init__(self, path: str, modules: dict[str, LoraFactors] | None, metadata: dict[str, str], style: str,
                 family: ModelFamily, tensors: dict[str, torch.Tensor] | None = None):
        self.path = path
        self.modules = modules  # None: not a plain LoRA (see `tools.file_modules`)
        self.metadata = metadata
        self.style = style
        self.family = family
        self.tensors = tensors or {}  # the file's tensors (kohya names)

    @property
    def title(self) -> str:
        return self.metadata.get("modelspec.title") or Path(self.path).stem


def load_lora(path: str | Path, family: str | None = None, *, any_algorithm: bool = False) -> LoadedLora:
    """Read a LoRA file and parse it with its family's key layout (guessed unless given).

    When `family` is given (the base model's), a file that reads as another family's LoRA is refused by name.
    diffusers/PEFT files of families whose kohya modules are fused layers are converted to them first. With
    `any_algorithm` a file of another adapter algorithm (LoHa, DoRA, OFT, ...) is returned with `modules` None
    (its tensors are read by `tools.file_modules` with the base model) instead of being refused.
    """
    tensors, metadata = load_lora_file(path)
    if not tensors:
        raise CheckpointError(f"{path}: the file holds no tensors")
    modules_guess = [key.partition(".")[0] if key.startswith("lora_") else key for key in tensors]
    guessed = guess_lora_family(modules_guess, metadata)
    if family is not None and guessed is not None and guessed != family:
        raise CheckpointError(
            f"{path}: this is a {family_title(guessed)} LoRA (e.g. key {next(iter(tensors))}), but the base model is "
            f"{family_title(family)}"
        )
    family = family or guessed
    if family is None:
        raise CheckpointError(f"{path}: cannot tell which model family this LoRA is for (e.g. key {next(iter(tensors))})")
    model_family = get_family(family)
    converted = False
    if any(".lora_A." in k or ".lora_B." in k for k in tensors):
        read = _read_peft(tensors, metadata, model_family, str(path))
        if read is not None:
            (tensors, metadata), converted = read, True
    if any_algorithm and detect_algorithm([k for k in tensors if k.rpartition(".")[2] not in ("w_norm", "b_norm")]) != "lora":
        return LoadedLora(str(path), None, metadata, "kohya", model_family, tensors)
    modules, style = read_modules(tensors, model_family.lora_layout, source=str(path))
    return LoadedLora(str(path), modules, metadata, "peft" if converted else style, model_family, tensors)


def _read_peft(tensors: dict, metadata: dict, family: ModelFamily, source: str) -> tuple[dict, dict] | None:
    """A PEFT-layout file as kohya tensors, where the family converts whole states (errors name the file)."""
    try:
        return family.lora_from_diffusers(tensors, metadata)
    except (CheckpointError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{source}: {exc}") from exc


def uniform_value(values: Sequence[float]) -> str:
    """The value as sd-scripts writes ss_network_dim/alpha: the one value, or `Dynamic` when they differ."""
    distinct = sorted(set(values))
    if len(distinct) != 1:
        return "Dynamic"
    value = distinct[0]
    return str(int(value)) if float(value).is_integer() else str(value)


def _version_of(metadata: Mapping[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version")
    if version:
        return version
    if metadata.get("ss_v2") == "True":
        return "sd_v2"
    return None


def merged_metadata(
    sources: Sequence[LoadedLora],
    modules: Mapping[str, LoraFactors],
    *,
    title: str,
    family: ModelFamily,
    version: str | None = None,
    variant: str | None = None,
    extra: Mapping[str, str] | None = None,
    with_modelspec: bool = True,
) -> dict[str, str]:
    """The minimal `ss_*` keys plus ModelSpec for a LoRA built from `sources` (merged, extracted...).

    The base-model version comes from the argument, else from the first source that records one, else the family's
    default; its ModelSpec facts are the family's (`base_model`), the ones training writes. The variant (FLUX.1
    schnell) comes from the argument, else from a source's ModelSpec architecture.
    """
    version = version or next((v for v in (_version_of(s.metadata) for s in sources) if v), None)
    recorded = (s.metadata.get("modelspec.architecture", "").split("/")[0] for s in sources)
    variant = variant or next((v for v in (family.variant_of_architecture(a) for a in recorded) if v), None)
    v_prediction = any(s.metadata.get("modelspec.prediction_type") == "v" for s in sources)
    facts = family.base_model(version, variant=variant, v_prediction=v_prediction)
    known = version is None or facts.version == version  # a version the family does not know is kept, without ModelSpec
    plain = [m for m in modules.values() if not m.is_spatial]
    spatial = [m for m in modules.values() if m.is_spatial]
    metadata = {
        "ss_network_module": family.default_network_module,
        "ss_base_model_version": facts.version if known else version,
        "ss_v2": str(known and facts.v2),
        "ss_network_dim": uniform_value([m.rank for m in plain] or [m.rank for m in spatial]),
        "ss_network_alpha": uniform_value([m.alpha_value for m in plain] or [m.alpha_value for m in spatial]),
    }
    if spatial:
        conv = {"conv_dim": uniform_value([m.rank for m in spatial]), "conv_alpha": uniform_value([m.alpha_value for m in spatial])}
        metadata["ss_network_args"] = json.dumps(conv)
    metadata.update(extra or {})
    if with_modelspec and known:
        merged_from = ", ".join(s.title for s in sources) or None
        spec_extra = {"merged_from": merged_from} if merged_from and len(sources) > 1 else None
        metadata.update(build_modelspec(facts.architecture, facts.implementation, title, facts.resolution,
                                        facts.prediction_type, extra=spec_extra))
    return metadata


def save_lora(
    modules: Mapping[str, LoraFactors],
    path: Path,
    fmt: str,
    metadata: Mapping[str, str],
    save_dtype: torch.dtype | None,
    passthrough: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, str]:
    """Write the modules in kohya layout, with `passthrough` tensors (e.g. LyCORIS norm modules) as they are
    (atomically, with fresh `sshs_*` hashes); returns the metadata."""
    clean = {k: v for k, v in metadata.items() if k not in _HASH_KEYS}
    state = {**to_state_dict(modules), **(passthrough or {})}
    return save_lora_file(state, path, clean, save_dtype=save_dtype, model_format=fmt)
