"""Z-Image's transformer in ComfyUI's layout (`z_image_turbo_bf16.safetensors`, the Lumina 2 NextDiT names) and
in diffusers' layout, both ways, as pure renames of a state dict.

ComfyUI fuses each block's q, k and v into `attention.qkv` (rows q, k, v) and names the rest after Lumina 2:
`attention.out` (diffusers `attention.to_out.0`), `attention.q_norm`/`k_norm` (`norm_q`/`norm_k`), `x_embedder`
and `final_layer` (diffusers keeps one per patch size: `all_x_embedder.2-1`, `all_final_layer.2-1`).
"""

from __future__ import annotations

import re

import torch

FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
PATCH_KEY = "2-1"  # patch size 2, frame patch 1: the one Z-Image has
_RENAMES = (  # (ComfyUI, diffusers) fragments
    (".attention.out.", ".attention.to_out.0."),
    (".attention.q_norm.", ".attention.norm_q."),
    (".attention.k_norm.", ".attention.norm_k."),
)
_TOP = (("x_embedder.", f"all_x_embedder.{PATCH_KEY}."), ("final_layer.", f"all_final_layer.{PATCH_KEY}."))
_QKV = re.compile(r"^(.*\.attention\.)qkv\.(weight|bias)$")


def strip_prefix(key: str) -> str:
    for prefix in FILE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def comfy_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = strip_prefix(key)
        if key == "norm_final.weight":  # a LayerNorm without parameters in diffusers
            continue
        fused = _QKV.match(key)
        if fused:
            for part, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{fused.group(1)}{part}.{fused.group(2)}"] = chunk
            continue
        out[_rename(key, list(_RENAMES), list(_TOP))] = value
    return out


def diffusers_to_comfy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [state[key.replace(".to_q.", f".{p}.")] for p in ("to_q", "to_k", "to_v")]
            out[key.replace(".to_q.", ".qkv.")] = torch.cat(parts, dim=0)
            continue
        out[_rename(key, [(b, a) for a, b in _RENAMES], [(b, a) for a, b in _TOP])] = value
    return out


def _rename(key: str, inner: list[tuple[str, str]], top: list[tuple[str, str]]) -> str:
    for old, new in top:
        if key.startswith(old):
            key = new + key[len(old):]
    for old, new in inner:
        key = key.replace(old, new)
    return key


def is_comfy_layout(keys: list[str]) -> bool:
    return any(strip_prefix(k).endswith(".attention.qkv.weight") for k in keys)
