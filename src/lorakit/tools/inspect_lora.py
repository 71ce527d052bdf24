"""Describe a LoRA file: algorithm, family, ranks, alphas, modules per component, metadata, and which
loaders accept its keys.

This works on raw keys and shapes only, so it also describes files the other tools refuse (LoHa, LoKr,
other families). The loader table follows what each loader's key mapping accepts per family and layout
(ComfyUI `comfy/lora.py`, A1111 `extensions-builtin/Lora`, Forge `backend/patcher/lora.py`, diffusers
`lora_conversion_utils`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping

import torch

from lorakit.families.base import ModelFamily, peft_module_path
from lorakit.families.registry import get_family, guess_lora_family
from lorakit.tools.lora_state import detect_algorithm

__all__ = ["describe", "format_report", "loader_support", "report_json"]

_COMPONENT_PREFIXES = (
    ("lora_unet_", "unet"), ("lora_te1_", "text_encoder_1"), ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"), ("lora_te_", "text_encoder"), ("unet.", "unet"),
    ("transformer.", "transformer"), ("text_encoder_3.", "text_encoder_3"), ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"),
    ("lycoris_", "unet"), ("text_encoders.t5xxl.", "t5xxl"),
)
_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight")
_LOADERS = ("sd-scripts", "ComfyUI", "A1111/Forge", "diffusers")


def _layout_style(keys: list[str]) -> str:
    if any(k.startswith(("lora_unet_", "lora_te", "lycoris_")) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    return "unknown"


def _component(key: str) -> str:
    key = key.removeprefix("base_model.model.")
    for prefix, component in _COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return component
    return "other"


def _module_name(key: str, style: str) -> str:
    """kohya module names hold no dots; PEFT paths do, so their tensor suffix is cut instead."""
    return key.partition(".")[0] if style == "kohya" else peft_module_path(key)


def _dora_on_output(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """A `dora_scale` of shape (out, 1, ...) holds one magnitude per output channel (wd_on_output=True); the
    input-axis form is (1, in, ...)."""
    return any(k.endswith(".dora_scale") and v.dim() >= 2 and v.shape[0] > 1 for k, v in state_dict.items())


def describe(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict:
    """A JSON-ready description of a LoRA state dict and its metadata."""
    keys = list(state_dict)
    algorithm = detect_algorithm(keys)
    downs = {k: v for k, v in state_dict.items() if k.endswith(_DOWN_SUFFIXES)}
    if algorithm == "lora" and any(v.dim() == 4 and tuple(v.shape[2:]) != (1, 1) for v in downs.values()):
        algorithm = "locon (LoRA-C3Lier)"
    style = _layout_style(keys)
    modules = {_module_name(k, style) for k in keys}
    ranks = Counter(int(v.shape[0]) for v in downs.values())
    alphas = Counter(float(v.reshape(-1)[0]) for k, v in state_dict.items() if k.endswith(".alpha") and v.numel() == 1)
    family = guess_lora_family([k if style != "kohya" else k.partition(".")[0] for k in keys], dict(metadata))
    dtypes = Counter(str(v.dtype).removeprefix("torch.") for v in state_dict.values())
    return {
        "algorithm": algorithm,
        "family": family or "unknown",
        "layout": style,
        "modules": len(modules),
        "modules_per_component": dict(Counter(_component(name) for name in modules)),
        "ranks": {str(r): n for r, n in sorted(ranks.items())},
        "alphas": {f"{a:g}": n for a, n in sorted(alphas.items())} or {"(none: alpha = rank)": len(downs)},
        "dtypes": dict(dtypes),
        "parameters": sum(v.numel() for v in state_dict.values()),
        "loaders": loader_support(style, algorithm, family, keys, dora_on_output=_dora_on_output(state_dict)),
        "metadata": {k: metadata[k] for k in sorted(metadata) if k.startswith(("ss_", "sshs_", "modelspec."))},
    }


def loader_support(style: str, algorithm: str, family: str | None, keys: list[str], *, dora_on_output: bool = False
                   ) -> dict[str, str]:
    """For each loader, `yes`, `no` or a short qualification, for this layout, algorithm and family (the family's
    own table; a file of no known family gets what holds for any)."""
    if style not in ("kohya", "diffusers"):
        return {loader: "unknown layout" for loader in _LOADERS}
    known: ModelFamily = get_family(family) if family else ModelFamily()
    return known.loader_support(style, algorithm, keys, dora_on_output=dora_on_output)


def format_report(path: str, report: dict, *, show_all_metadata: bool = False) -> str:
    """The description as readable text."""
    lines = [f"{path}"]
    for label, key in (("algorithm", "algorithm"), ("family", "family"), ("key layout", "layout"), ("modules", "modules")):
        lines.append(f"  {label:<12} {report[key]}")
    lines.append(f"  {'components':<12} " + ", ".join(f"{c}: {n}" for c, n in report["modules_per_component"].items()))
    lines.append(f"  {'ranks':<12} " + ", ".join(f"{r} ({n} modules)" for r, n in report["ranks"].items()))
    lines.append(f"  {'alphas':<12} " + ", ".join(f"{a} ({n} modules)" for a, n in report["alphas"].items()))
    lines.append(f"  {'dtypes':<12} " + ", ".join(f"{d} ({n} tensors)" for d, n in report["dtypes"].items()))
    lines.append(f"  {'parameters':<12} {report['parameters']:,}")
    lines.append("  loaders")
    lines += [f"    {name:<12} {verdict}" for name, verdict in report["loaders"].items()]
    metadata = report["metadata"]
    if metadata:
        lines.append("  metadata")
        for key, value in metadata.items():
            shown = value if show_all_metadata or len(value) <= 120 else value[:117] + "..."
            lines.append(f"    {key} = {shown}")
    else:
        lines.append("  metadata     (none)")
    return "\n".join(lines)


def report_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False)
