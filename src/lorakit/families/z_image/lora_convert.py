"""Z-Image LoRA files between lorakit's (ComfyUI's) names and diffusers' names.

Kohya → diffusers: the fused `attention.qkv` LoRA becomes three LoRAs sharing its down matrix, each taking its
third of the up rows (q, k, v); `attention.out` becomes `attention.to_out.0`; alpha/rank is folded into
`lora_B` (PEFT files have no alpha) unless `keep_alpha`. Diffusers → kohya (also ai-toolkit's `diffusion_model.`
files): q/k/v with one shared down matrix fuse back at their rank; others fuse block-diagonally (down rows
stacked, up blocks on the diagonal), each part's scale folded into its up block first.
"""

from __future__ import annotations

import torch

from lorakit.families.z_image.lora_keys import LORA_LAYOUT

PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.")
QKV_PARTS = ("to_q", "to_k", "to_v")


def _modules(state: dict[str, torch.Tensor], down: str, up: str) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for suffix, role in ((f".{down}.weight", "down"), (f".{up}.weight", "up"), (".alpha", "alpha")):
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[role] = value
                break
        else:
            raise ValueError(f"{key}: not a plain LoRA key (only LoRA files convert between the layouts)")
    return modules


def kohya_to_diffusers(state: dict[str, torch.Tensor], metadata: dict[str, str], *, keep_alpha: bool = False
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out: dict[str, torch.Tensor] = {}
    for name, module in _modules(state, "lora_down", "lora_up").items():
        path = LORA_LAYOUT.kohya_to_path(name)
        if path is None:
            raise ValueError(f"{name} is not a Z-Image module name")
        down, up = module["down"], module["up"]
        rank = down.shape[0]
        alpha = float(module["alpha"]) if "alpha" in module else float(rank)
        if not keep_alpha:
            up = (up.float() * (alpha / rank)).to(up.dtype)
        if path.endswith(".attention.qkv"):
            parts = {path[: -len("qkv")] + part: chunk for part, chunk in zip(QKV_PARTS, up.chunk(3, dim=0))}
        else:
            parts = {path.replace(".attention.out", ".attention.to_out.0"): up}
        for target, part_up in parts.items():
            out[f"{target}.lora_A.weight"] = down.contiguous()
            out[f"{target}.lora_B.weight"] = part_up.contiguous()
            if keep_alpha:
                out[f"{target}.alpha"] = torch.tensor(alpha)
    return out, dict(metadata)


def diffusers_to_kohya(state: dict[str, torch.Tensor], metadata: dict[str, str]
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    modules = {_strip(name): m for name, m in _modules(state, "lora_A", "lora_B").items()}
    out: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        if name.endswith(QKV_PARTS[1:]) and ".attention." in name:
            continue
        if name.endswith(".attention.to_q"):
            base = name[: -len("to_q")]
            parts = [modules.get(base + part) for part in QKV_PARTS]
            if any(p is None for p in parts):
                raise ValueError(f"{base}: q, k and v must all be present to fuse them into ComfyUI's qkv")
            down, up = _fuse([_folded(p) for p in parts])
            kohya = _kohya_name(base + "qkv")
        else:
            down, up = _folded(module)
            kohya = _kohya_name(name.replace(".attention.to_out.0", ".attention.out"))
        out[f"{kohya}.lora_down.weight"] = down.contiguous()
        out[f"{kohya}.lora_up.weight"] = up.contiguous()
        out[f"{kohya}.alpha"] = torch.tensor(float(down.shape[0]))
    return out, dict(metadata)


def _strip(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _kohya_name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def _folded(module: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with the module's alpha/rank folded into up (scale 1 afterwards)."""
    down, up = module["down"], module["up"]
    if "alpha" in module:
        up = (up.float() * (float(module["alpha"]) / down.shape[0])).to(up.dtype)
    return down, up


def _fuse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    downs, ups = zip(*parts)
    if all(torch.equal(downs[0], d) for d in downs[1:]):
        return downs[0], torch.cat(ups, dim=0)
    return torch.cat(downs, dim=0), torch.block_diag(*ups)
