"""FLUX.1 transformer weights: Black Forest Labs' layout (`flux1-dev.safetensors`) <-> diffusers', as data.

BFL files fuse what diffusers keeps apart: `img_attn.qkv` = [to_q; to_k; to_v], `txt_attn.qkv` = [add_q_proj;
add_k_proj; add_v_proj], a single block's `linear1` = [to_q; to_k; to_v; proj_mlp]. The final modulation stores
(shift, scale) where diffusers stores (scale, shift). diffusers' own converter assumes width 3072, so these
tables derive every split from the tensors' shapes and work at any width (the tiny test models included).

The same tables name LoRA modules: the kohya name of a layer is `lora_unet_` + its BFL path with dots
replaced by underscores (`lora_unet_double_blocks_0_img_attn_qkv`), which is what ComfyUI, Forge and
diffusers' kohya-FLUX reader expect.
"""

from __future__ import annotations

import re

import torch

from lorakit.errors import CheckpointError

# Top-level layers: BFL path -> diffusers path.
TOP_LEVEL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
# (shift, scale) in BFL, (scale, shift) in diffusers.
FINAL_MODULATION = ("final_layer.adaLN_modulation.1", "norm_out.linear")

# Per double block: BFL sub-path -> diffusers sub-path (one-to-one layers).
DOUBLE_LAYERS = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
# Fused BFL layers -> the diffusers layers stacked in them, in order. The last part of `linear1` takes the
# remaining rows (the MLP is wider than the attention projections).
DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE_LAYERS = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}

DOUBLE_PREFIX = ("double_blocks", "transformer_blocks")
SINGLE_PREFIX = ("single_blocks", "single_transformer_blocks")
# ComfyUI and some merges store the transformer under this prefix; BFL's own files have none.
COMFY_PREFIX = "model.diffusion_model."


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ComfyUI `model.diffusion_model.` prefix if the file uses it."""
    if any(k.startswith(COMFY_PREFIX) for k in state):
        return {k[len(COMFY_PREFIX) :]: v for k, v in state.items() if k.startswith(COMFY_PREFIX)}
    return state


def is_bfl_transformer(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("double_blocks.", "single_blocks.", COMFY_PREFIX + "double_blocks.")) for k in state)


def block_count(state: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {int(m[1]) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def fused_split_sizes(parts: int, total: int, width: int) -> list[int]:
    """Row counts of a fused weight: `width` per attention part, the rest for a trailing MLP part."""
    if parts == 3:
        return [width] * 3
    return [width] * (parts - 1) + [total - width * (parts - 1)]


def bfl_to_diffusers(state: dict[str, torch.Tensor], source: str = "checkpoint", final_layer: bool = True
                     ) -> dict[str, torch.Tensor]:
    """A BFL-layout FLUX transformer state dict (prefixed or not) in diffusers' FluxTransformer2DModel names
    (without `final_layer`: the blocks and embedders of a ControlNet, which has none)."""
    state = strip_prefix(state)
    if "img_in.weight" not in state:
        raise CheckpointError(f"{source}: not a FLUX transformer in BFL layout (no img_in.weight)")
    width = state["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    for bfl, diff in TOP_LEVEL.items():
        for leaf in ("weight", "bias"):
            if f"{bfl}.{leaf}" in state:
                out[f"{diff}.{leaf}"] = state[f"{bfl}.{leaf}"]
    for leaf in ("weight", "bias") if final_layer else ():  # a ControlNet has no final layer
        out[f"{FINAL_MODULATION[1]}.{leaf}"] = _swap_halves(state[f"{FINAL_MODULATION[0]}.{leaf}"])
    for (bfl_prefix, diff_prefix), layers, norms, fused in (
        (DOUBLE_PREFIX, DOUBLE_LAYERS, DOUBLE_NORMS, DOUBLE_FUSED),
        (SINGLE_PREFIX, SINGLE_LAYERS, SINGLE_NORMS, SINGLE_FUSED),
    ):
        for index in range(block_count(state, bfl_prefix)):
            src, dst = f"{bfl_prefix}.{index}.", f"{diff_prefix}.{index}."
            for bfl, diff in layers.items():
                for leaf in ("weight", "bias"):
                    out[f"{dst}{diff}.{leaf}"] = _take(state, f"{src}{bfl}.{leaf}", source)
            for bfl, diff in norms.items():
                out[f"{dst}{diff}"] = _take(state, f"{src}{bfl}", source)
            for bfl, parts in fused.items():
                for leaf in ("weight", "bias"):
                    tensor = _take(state, f"{src}{bfl}.{leaf}", source)
                    sizes = fused_split_sizes(len(parts), tensor.shape[0], width)
                    for part, piece in zip(parts, torch.split(tensor, sizes, dim=0)):
                        out[f"{dst}{part}.{leaf}"] = piece.contiguous()
    return out


def diffusers_to_bfl(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel weights in BFL names (the layout of `flux1-dev.safetensors`)."""
    out: dict[str, torch.Tensor] = {}
    for bfl, diff in TOP_LEVEL.items():
        for leaf in ("weight", "bias"):
            if f"{diff}.{leaf}" in state:
                out[f"{bfl}.{leaf}"] = state[f"{diff}.{leaf}"]
    for leaf in ("weight", "bias"):  # like the top-level layers, converted when present (a block-only state has none)
        if f"{FINAL_MODULATION[1]}.{leaf}" in state:
            out[f"{FINAL_MODULATION[0]}.{leaf}"] = _swap_halves(state[f"{FINAL_MODULATION[1]}.{leaf}"])
    for (bfl_prefix, diff_prefix), layers, norms, fused in (
        (DOUBLE_PREFIX, DOUBLE_LAYERS, DOUBLE_NORMS, DOUBLE_FUSED),
        (SINGLE_PREFIX, SINGLE_LAYERS, SINGLE_NORMS, SINGLE_FUSED),
    ):
        for index in range(block_count(state, diff_prefix)):
            src, dst = f"{diff_prefix}.{index}.", f"{bfl_prefix}.{index}."
            for bfl, diff in layers.items():
                for leaf in ("weight", "bias"):
                    out[f"{dst}{bfl}.{leaf}"] = state[f"{src}{diff}.{leaf}"]
            for bfl, diff in norms.items():
                out[f"{dst}{bfl}"] = state[f"{src}{diff}"]
            for bfl, parts in fused.items():
                for leaf in ("weight", "bias"):
                    out[f"{dst}{bfl}.{leaf}"] = torch.cat([state[f"{src}{part}.{leaf}"] for part in parts], dim=0)
    return {prefix + k: v for k, v in out.items()}


def _take(state: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: the FLUX transformer lacks {key}; the file may be truncated or another model")
    return state[key]


def transformer_config_from_bfl(state: dict[str, torch.Tensor], axes_dims_rope: tuple[int, ...] | None) -> dict:
    """The FluxTransformer2DModel config a BFL state dict implies (the RoPE axes cannot be read from weights)."""
    state = strip_prefix(state)
    width, in_channels = state["img_in.weight"].shape
    head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    return {
        "patch_size": 1,
        "in_channels": int(in_channels),
        "out_channels": int(state["final_layer.linear.weight"].shape[0]),
        "num_layers": block_count(state, "double_blocks"),
        "num_single_layers": block_count(state, "single_blocks"),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(width // head_dim),
        "joint_attention_dim": int(state["txt_in.weight"].shape[1]),
        "pooled_projection_dim": int(state["vector_in.in_layer.weight"].shape[1]),
        "guidance_embeds": "guidance_in.in_layer.weight" in state,
        "axes_dims_rope": list(axes_dims_rope) if axes_dims_rope else None,
    }


# ---------------------------------------------------------------------------------------------------------
# LoRA naming
# ---------------------------------------------------------------------------------------------------------


def lora_targets_by_block(num_double: int, num_single: int) -> list[tuple[str, str, tuple[str, ...], str]]:
    """(kohya name, BFL path, diffusers paths, kind) for every LoRA-able block layer, as sd-scripts' lora_flux.

    `kind` selects the per-type rank (`img_attn`, `txt_attn`, `img_mlp`, `txt_mlp`, `img_mod`, `txt_mod`,
    `single`, `single_mod`); fused BFL layers list several diffusers layers.
    """
    rows: list[tuple[str, str, tuple[str, ...], str]] = []
    double = [
        ("img_attn.qkv", DOUBLE_FUSED["img_attn.qkv"], "img_attn"), ("img_attn.proj", ("attn.to_out.0",), "img_attn"),
        ("img_mlp.0", ("ff.net.0.proj",), "img_mlp"), ("img_mlp.2", ("ff.net.2",), "img_mlp"),
        ("img_mod.lin", ("norm1.linear",), "img_mod"),
        ("txt_attn.qkv", DOUBLE_FUSED["txt_attn.qkv"], "txt_attn"), ("txt_attn.proj", ("attn.to_add_out",), "txt_attn"),
        ("txt_mlp.0", ("ff_context.net.0.proj",), "txt_mlp"), ("txt_mlp.2", ("ff_context.net.2",), "txt_mlp"),
        ("txt_mod.lin", ("norm1_context.linear",), "txt_mod"),
    ]
    single = [
        ("linear1", SINGLE_FUSED["linear1"], "single"), ("linear2", ("proj_out",), "single"),
        ("modulation.lin", ("norm.linear",), "single_mod"),
    ]
    for index in range(num_double):
        for bfl, parts, kind in double:
            path = f"double_blocks.{index}.{bfl}"
            rows.append((_kohya(path), path, tuple(f"transformer_blocks.{index}.{p}" for p in parts), kind))
    for index in range(num_single):
        for bfl, parts, kind in single:
            path = f"single_blocks.{index}.{bfl}"
            rows.append((_kohya(path), path, tuple(f"single_transformer_blocks.{index}.{p}" for p in parts), kind))
    return rows


# `in_dims` order in sd-scripts: img, time, vector, guidance, txt.
EMBEDDER_GROUPS = (
    ("img_in",), ("time_in.in_layer", "time_in.out_layer"), ("vector_in.in_layer", "vector_in.out_layer"),
    ("guidance_in.in_layer", "guidance_in.out_layer"), ("txt_in",),
)


def _kohya(bfl_path: str) -> str:
    return "lora_unet_" + bfl_path.replace(".", "_")


def embedder_kohya_name(bfl_path: str) -> str:
    return _kohya(bfl_path)
