"""Black Forest Labs' transformer layout (`double_blocks.N.*`, `single_blocks.N.*`) <-> diffusers', driven by tables.

FLUX.1, Chroma and FLUX.2 share BFL's layout and differ in their tables: which layers a block holds, which are
fused in BFL files (`img_attn.qkv` = [to_q; to_k; to_v], ...), and what lives outside the blocks. A family
describes its model as a `BflTables`; `bfl_to_diffusers` / `diffusers_to_bfl` convert with it, deriving every
split of a fused weight from the tensors' shapes, so they work at any width (the tiny test models included).

The same tables name LoRA modules: the kohya name of a layer is `lora_unet_` + its BFL path with dots replaced
by underscores (`lora_unet_double_blocks_0_img_attn_qkv`), which is how ComfyUI names the layers of any model it
loads in BFL layout (`lora_unet_` + the weight's path) and what diffusers' kohya readers expect.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lorakit.errors import CheckpointError

# ComfyUI and some merges store the transformer under this prefix; BFL's own files have none.
COMFY_PREFIX = "model.diffusion_model."
DOUBLE_PREFIX = ("double_blocks", "transformer_blocks")
SINGLE_PREFIX = ("single_blocks", "single_transformer_blocks")


@dataclass(frozen=True)
class BflTables:
    """One model's BFL <-> diffusers tables.

    `top_level`: layers outside the blocks (BFL path -> diffusers path), converted when present; `renames`: single
    tensors renamed as they are (e.g. a norm's `.scale` -> `.weight`); `final_modulation`: the output modulation
    stored (shift, scale) in BFL and (scale, shift) in diffusers, None when the model has none. Per block:
    one-to-one `*_layers`, `*_norms` (whole tensor names) and `*_fused` (a BFL layer -> the diffusers layers
    stacked in it, in order; the last part of a 4-part fusion takes the remaining rows). `leaves` are the
    tensors each block layer has (`("weight",)` for bias-free models).
    """

    top_level: Mapping[str, str]
    double_layers: Mapping[str, str]
    double_norms: Mapping[str, str]
    double_fused: Mapping[str, tuple[str, ...]]
    single_layers: Mapping[str, str]
    single_norms: Mapping[str, str]
    single_fused: Mapping[str, tuple[str, ...]]
    final_modulation: tuple[str, str] | None = None
    renames: Mapping[str, str] = field(default_factory=dict)
    leaves: tuple[str, ...] = ("weight", "bias")
    what: str = "FLUX transformer"  # for messages

    @property
    def blocks(self):
        """(prefixes, layers, norms, fused) of the double and the single blocks."""
        return ((DOUBLE_PREFIX, self.double_layers, self.double_norms, self.double_fused),
                (SINGLE_PREFIX, self.single_layers, self.single_norms, self.single_fused))


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ComfyUI `model.diffusion_model.` prefix if the file uses it."""
    if any(k.startswith(COMFY_PREFIX) for k in state):
        return {k[len(COMFY_PREFIX) :]: v for k, v in state.items() if k.startswith(COMFY_PREFIX)}
    return state


def is_bfl_transformer(state: Mapping[str, object]) -> bool:
    return any(k.startswith(("double_blocks.", "single_blocks.", COMFY_PREFIX + "double_blocks.")) for k in state)


def has_key(keys: Sequence[str] | Mapping[str, object], name: str) -> bool:
    """Whether a BFL tensor name is among `keys`, with or without the ComfyUI prefix."""
    return name in keys or COMFY_PREFIX + name in keys


def block_count(state: Mapping[str, object], prefix: str) -> int:
    indices = {int(m[1]) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def fused_split_sizes(parts: int, total: int, width: int) -> list[int]:
    """Row counts of a fused weight: `width` per attention part, the rest for a trailing MLP part."""
    if parts == 3:
        return [width] * 3
    return [width] * (parts - 1) + [total - width * (parts - 1)]


def kohya_name(bfl_path: str) -> str:
    """The kohya LoRA name of a BFL layer (`double_blocks.0.img_attn.qkv` -> `lora_unet_double_blocks_0_img_attn_qkv`)."""
    return "lora_unet_" + bfl_path.replace(".", "_")


def _take(state: Mapping[str, torch.Tensor], key: str, source: str, what: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: the {what} lacks {key}; the file may be truncated or another model")
    return state[key]


def bfl_to_diffusers(tables: BflTables, state: dict[str, torch.Tensor], source: str = "checkpoint",
                     final_layer: bool = True) -> dict[str, torch.Tensor]:
    """A BFL-layout state dict (prefixed or not) in the diffusers model's names (without `final_layer`: the
    blocks and embedders of a ControlNet, which has none)."""
    state = strip_prefix(state)
    if "img_in.weight" not in state:
        raise CheckpointError(f"{source}: not a {tables.what} in BFL layout (no img_in.weight)")
    width = state["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    for bfl, diff in tables.top_level.items():
        for leaf in ("weight", "bias"):
            if f"{bfl}.{leaf}" in state:
                out[f"{diff}.{leaf}"] = state[f"{bfl}.{leaf}"]
    out.update({diff: state[bfl] for bfl, diff in tables.renames.items() if bfl in state})
    if tables.final_modulation and final_layer:
        bfl, diff = tables.final_modulation
        for leaf in tables.leaves:
            out[f"{diff}.{leaf}"] = swap_halves(_take(state, f"{bfl}.{leaf}", source, tables.what))
    for (bfl_prefix, diff_prefix), layers, norms, fused in tables.blocks:
        for index in range(block_count(state, bfl_prefix)):
            src, dst = f"{bfl_prefix}.{index}.", f"{diff_prefix}.{index}."
            for bfl, diff in layers.items():
                for leaf in tables.leaves:
                    out[f"{dst}{diff}.{leaf}"] = _take(state, f"{src}{bfl}.{leaf}", source, tables.what)
            for bfl, diff in norms.items():
                out[f"{dst}{diff}"] = _take(state, f"{src}{bfl}", source, tables.what)
            for bfl, parts in fused.items():
                for leaf in tables.leaves:
                    tensor = _take(state, f"{src}{bfl}.{leaf}", source, tables.what)
                    sizes = fused_split_sizes(len(parts), tensor.shape[0], width)
                    for part, piece in zip(parts, torch.split(tensor, sizes, dim=0)):
                        out[f"{dst}{part}.{leaf}"] = piece.contiguous()
    return out


def diffusers_to_bfl(tables: BflTables, state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers model's weights in BFL names (what the original single files hold); parts absent from `state`
    (a block-only state, say) are left out."""
    out: dict[str, torch.Tensor] = {}
    for bfl, diff in tables.top_level.items():
        for leaf in ("weight", "bias"):
            if f"{diff}.{leaf}" in state:
                out[f"{bfl}.{leaf}"] = state[f"{diff}.{leaf}"]
    out.update({bfl: state[diff] for bfl, diff in tables.renames.items() if diff in state})
    if tables.final_modulation:
        bfl, diff = tables.final_modulation
        for leaf in tables.leaves:
            if f"{diff}.{leaf}" in state:
                out[f"{bfl}.{leaf}"] = swap_halves(state[f"{diff}.{leaf}"])
    for (bfl_prefix, diff_prefix), layers, norms, fused in tables.blocks:
        for index in range(block_count(state, diff_prefix)):
            src, dst = f"{diff_prefix}.{index}.", f"{bfl_prefix}.{index}."
            for bfl, diff in layers.items():
                for leaf in tables.leaves:
                    out[f"{dst}{bfl}.{leaf}"] = state[f"{src}{diff}.{leaf}"]
            for bfl, diff in norms.items():
                out[f"{dst}{bfl}"] = state[f"{src}{diff}"]
            for bfl, parts in fused.items():
                for leaf in tables.leaves:
                    out[f"{dst}{bfl}.{leaf}"] = torch.cat([state[f"{src}{part}.{leaf}"] for part in parts], dim=0)
    return {prefix + k: v for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------
# LoRA rows
# ---------------------------------------------------------------------------------------------------------

#: (BFL sub-path, diffusers sub-paths stacked in it, kind) of one block's LoRA layers
BlockRows = Sequence[tuple[str, tuple[str, ...], str]]


def block_lora_rows(double: BlockRows, single: BlockRows, num_double: int, num_single: int
                    ) -> list[tuple[str, str, tuple[str, ...], str]]:
    """(kohya name, BFL path, diffusers paths, kind) of every LoRA layer of the blocks, in sd-scripts' order."""
    rows: list[tuple[str, str, tuple[str, ...], str]] = []
    for (bfl_prefix, diff_prefix), table, count in ((DOUBLE_PREFIX, double, num_double), (SINGLE_PREFIX, single, num_single)):
        for index in range(count):
            for bfl, parts, kind in table:
                path = f"{bfl_prefix}.{index}.{bfl}"
                rows.append((kohya_name(path), path, tuple(f"{diff_prefix}.{index}.{p}" for p in parts), kind))
    return rows
