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

from lorakit.errors import CheckpointError
from lorakit.tools.layouts import KeyLayout
from lorakit.tools.lora_state import LoraFactors, to_state_dict

__all__ = ["FORMATS", "convert_to_diffusers", "normalise_format", "sd3_from_peft", "sd3_to_peft", "to_diffusers", "to_kohya_modules"]

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
    modules: Mapping[str, LoraFactors], layout: KeyLayout, metadata: Mapping[str, str], *, keep_alpha: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The PEFT-layout tensors and metadata of kohya modules; SD3 and FLUX split their fused q/k/v."""
    if layout.peft_writer is None:
        return to_diffusers(modules, layout, keep_alpha=keep_alpha), dict(metadata)
    return layout.peft_writer(to_state_dict(modules), dict(metadata), keep_alpha=keep_alpha)


# ---------------------------------------------------------------------------------------------------------
# SD3: the family's converter (`families/sd3/lora_convert.py`) plus explicit alphas
# ---------------------------------------------------------------------------------------------------------


def sd3_to_peft(state: dict[str, torch.Tensor], metadata: dict[str, str], *, keep_alpha: bool = False) -> tuple[dict, dict]:
    """SD3 kohya -> PEFT. With `keep_alpha` the factors are converted at scale 1 (bit for bit) and every part
    gets an `.alpha` giving it its module's scale (alpha · part rank / module rank)."""
    from lorakit.families.sd3.lora_convert import kohya_to_diffusers

    if not keep_alpha:
        return kohya_to_diffusers(state, metadata)
    alphas = {k.removesuffix(".alpha"): float(v) for k, v in state.items() if k.endswith(".alpha")}
    unscaled = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    out, meta = kohya_to_diffusers(unscaled, metadata)  # no alpha: rank, i.e. scale exactly 1
    for name, paths, module_rank in _sd3_parts(unscaled):
        alpha = alphas.get(name, float(module_rank))
        for path in paths:
            part_rank = out[f"{path}.lora_A.weight"].shape[0]
            out[f"{path}.alpha"] = torch.tensor(alpha * part_rank / module_rank, dtype=torch.float32)
    return out, meta


def sd3_from_peft(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[dict, dict]:
    """SD3 PEFT -> kohya. `.alpha` keys (explicit scales, lora_B not folded) become the kohya alphas; without
    them the converter's rules apply (its recorded alphas, else alpha = rank)."""
    from lorakit.families.sd3.lora_convert import ALPHAS_METADATA_KEY, diffusers_to_kohya

    alphas = {k.removesuffix(".alpha"): float(v) for k, v in state.items() if k.endswith(".alpha")}
    factors = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    if not alphas:
        return diffusers_to_kohya(factors, metadata)
    meta = {k: v for k, v in metadata.items() if k != ALPHAS_METADATA_KEY}
    kohya, meta = diffusers_to_kohya(factors, meta)  # alpha = rank: the factors come back unscaled
    for name, paths, module_rank in _sd3_parts(kohya):
        values = {alphas[p] * module_rank / factors[f"{p}.lora_A.weight"].shape[0] for p in paths if p in alphas}
        if len(values) > 1:
            raise CheckpointError(f"key {paths[0]}.alpha: the parts of {name} give it different scales ({sorted(values)})")
        if values:
            kohya[f"{name}.alpha"] = torch.tensor(values.pop(), dtype=torch.float32)
    return kohya, meta


def _sd3_parts(kohya: dict[str, torch.Tensor]) -> list[tuple[str, list[str], int]]:
    """(kohya module, the PEFT paths it splits into, its rank) for every module of a kohya SD3 state."""
    from lorakit.adapters.formats import tensors_by_module
    from lorakit.families.sd3.lora_convert import hidden_from_kohya, kohya_to_diffusers

    modules = tensors_by_module(kohya)
    hidden = hidden_from_kohya(modules)  # the converter needs it to place the last modulation's halves
    rows = []
    for name, tensors in modules.items():
        single = {f"{name}.{k}": v for k, v in tensors.items() if k != "alpha"}
        parts, _ = kohya_to_diffusers(single, hidden_size=hidden)
        paths = [k.removesuffix(".lora_A.weight") for k in parts if k.endswith(".lora_A.weight")]
        rows.append((name, paths, tensors["lora_down.weight"].shape[0]))
    return rows
