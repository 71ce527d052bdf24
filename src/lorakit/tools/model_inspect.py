"""`lorakit model inspect`: what a checkpoint is, read from its headers (safetensors) or its folder layout.

Family (as training detects it), layout (single file or diffusers folder, with its pipeline class), the parts
it holds (key groups or subfolders), tensors and parameters per dtype, the size on disk and the metadata
(what sd-scripts' `show_metadata.py` prints). Safetensors files are never loaded; a `.ckpt` is read with
`weights_only` to count its tensors.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors import safe_open

from lorakit.checkpoint_io import read_checkpoint
from lorakit.errors import ConfigError
from lorakit.families.common.headers import class_name
from lorakit.families.registry import detect_family, get_family

_ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class ModelReport:
    path: str
    family: str
    recognised: bool
    layout: str
    size_bytes: int
    tensors: int = 0
    parameters: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> parameters
    parts: dict[str, int] = field(default_factory=dict)  # key group or subfolder -> tensors
    metadata: dict[str, str] = field(default_factory=dict)


def inspect_model(path: str) -> ModelReport:
    source = Path(path)
    if not source.exists():
        raise ConfigError([f"{path}: file or folder not found"])
    name = detect_family(path)
    recognised = get_family(name).owns_checkpoint(path)
    files = [source] if source.is_file() else sorted(f for f in source.rglob("*") if f.suffix in (".safetensors", ".bin", ".ckpt"))
    layout = "single file" if source.is_file() else f"diffusers folder ({class_name(source / 'model_index.json') or class_name(source / 'config.json') or 'no model_index.json'})"
    report = ModelReport(str(path), name, recognised, layout, sum(f.stat().st_size for f in files))
    for file in files:
        part = None if source.is_file() else str(file.parent.relative_to(source)) or "."
        _count(file, part, report)
    return report


def _count(file: Path, part: str | None, report: ModelReport) -> None:
    entries, metadata = _entries(file)
    if part is None:
        report.metadata.update(metadata)
    dtypes: Counter[str] = Counter(report.dtypes)
    parts: Counter[str] = Counter(report.parts)
    for key, (dtype, count) in entries.items():
        report.tensors += 1
        report.parameters += count
        dtypes[dtype] += count
        parts[part if part is not None else _group(key)] += 1
    report.dtypes, report.parts = dict(dtypes), dict(parts)


def _entries(file: Path) -> tuple[dict[str, tuple[str, int]], dict[str, str]]:
    """key -> (dtype, parameters), and the file's metadata."""
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt") as handle:
            entries = {}
            for key in handle.keys():
                piece = handle.get_slice(key)
                count = 1
                for size in piece.get_shape():
                    count *= size
                entries[key] = (piece.get_dtype(), count)
            return entries, dict(handle.metadata() or {})
    checkpoint = read_checkpoint(file)
    return ({k: (str(v.dtype).removeprefix("torch."), v.numel()) for k, v in checkpoint.state_dict.items()},
            dict(checkpoint.metadata))


def _group(key: str) -> str:
    """A key's part: its first two dotted segments (`model.diffusion_model`, `first_stage_model.encoder`, ...)
    where the second names a module rather than a block number."""
    pieces = key.split(".")
    if len(pieces) > 2 and not pieces[1].isdigit():
        return ".".join(pieces[:2])
    return pieces[0]


def render(report: ModelReport, *, as_json: bool = False, metadata_only: bool = False) -> str:
    if metadata_only:
        return json.dumps(report.metadata, indent=4, sort_keys=True) if report.metadata else "No metadata found"
    if as_json:
        return json.dumps(asdict(report), indent=2, sort_keys=True)
    family = get_family(report.family).title + ("" if report.recognised else " (not recognised; taken for this family)")
    lines = [
        f"model:       {report.path}",
        f"family:      {family}",
        f"layout:      {report.layout}",
        f"size:        {report.size_bytes / 2**20:,.1f} MiB in {report.tensors} tensors, {report.parameters:,} parameters",
        "dtypes:      " + ", ".join(f"{d} {n:,}" for d, n in sorted(report.dtypes.items(), key=lambda x: -x[1])),
        "parts:",
        *(f"  {name}: {count} tensors" for name, count in sorted(report.parts.items())),
        "metadata:" + ("" if report.metadata else " none"),
        *(f"  {key}: {_short(value)}" for key, value in sorted(report.metadata.items())),
    ]
    return "\n".join(lines)


def _short(value: str, limit: int = 160) -> str:
    return value if len(value) <= limit else value[:limit] + f"... ({len(value)} characters)"
