"""Convert LoRA files between the kohya layout and the diffusers/PEFT layout.

kohya: `lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight` / `.lora_up.weight` / `.alpha`.
diffusers/PEFT: `unet.down_blocks.0.attentions.0.proj_in.lora_A.weight` / `.lora_B.weight`.

PEFT files have no per-module alpha: loaders assume alpha = rank unless told otherwise. So by default the
scale alpha/rank is folded into `lora_B` (ΔW unchanged everywhere the file is loaded); with `keep_alpha`
the factors are copied bit for bit and an explicit `.alpha` tensor is written beside them (ComfyUI reads it;
the conversion back to kohya is then exact to the bit).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lorakit.adapters.key_layout import KeyLayout
from lorakit.families.base import ModelFamily
from lorakit.tools.lora_state import LoraFactors, to_state_dict

__all__ = ["FORMATS", "convert_to_diffusers", "normalise_format", "to_diffusers", "to_kohya_modules"]

FORMATS = {"kohya": "kohya", "sd-scripts": "kohya", "diffusers": "diffusers", "peft": "diffusers", "ai-toolkit": "diffusers"}


def normalise_format(name: str) -> str | None:
    """`kohya`/`sd-scripts` -> kohya, `diffusers`/`peft`/`ai-toolkit` -> diffusers; None if unknown."""
    return FORMATS.get(name.lower())


def to_diffusers(modules: Mapping[str, LoraFactors], layout: KeyLayout, *, keep_alpha: bool = False) -> dict[str, torch.Tensor]:
    """The PEFT-layout state dict of kohya-named modules (names validated by the layout when read)."""
    state: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        path = layout.kohya_to_diffusers_path(name)
        if path is None:  # read_modules already refused such names; kept as a guard for direct callers
            raise ValueError(f"{name} is not a module name of the {layout.family} family")
        up = module.up
        if keep_alpha:
            state[f"{path}.alpha"] = torch.tensor(module.alpha_value, dtype=torch.float32)
        elif module.scale != 1.0:
            # fold in float32 (at least) and return to the file's dtype, so half-precision files stay half
            up = (up.to(torch.promote_types(up.dtype, torch.float32)) * module.scale).to(up.dtype)
        state[f"{path}.lora_A.weight"] = module.down.contiguous()
        state[f"{path}.lora_B.weight"] = up.contiguous()
    return state


def to_kohya_modules(modules: Mapping[str, LoraFactors]) -> dict[str, LoraFactors]:
    """Modules read from any layout, as kohya modules; alpha = rank where the file stored none (PEFT's rule)."""
    return {name: LoraFactors(name, m.down, m.up, m.alpha_value) for name, m in modules.items()}


def convert_to_diffusers(
    modules: Mapping[str, LoraFactors], family: ModelFamily, metadata: Mapping[str, str], *, keep_alpha: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The PEFT-layout tensors and metadata of kohya modules; a family whose kohya modules are fused layers
    converts the whole state itself (splitting them into their parts)."""
    converted = family.lora_to_diffusers(to_state_dict(modules), dict(metadata), keep_alpha=keep_alpha)
    if converted is None:
        return to_diffusers(modules, family.lora_layout, keep_alpha=keep_alpha), dict(metadata)
    return converted
