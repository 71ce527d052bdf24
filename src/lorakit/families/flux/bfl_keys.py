"""FLUX.1 transformer weights: Black Forest Labs' layout (`flux1-dev.safetensors`) <-> diffusers', as data.

BFL files fuse what diffusers keeps apart: `img_attn.qkv` = [to_q; to_k; to_v], `txt_attn.qkv` = [add_q_proj;
add_k_proj; add_v_proj], a single block's `linear1` = [to_q; to_k; to_v; proj_mlp]. The final modulation stores
(shift, scale) where diffusers stores (scale, shift). diffusers' own converter assumes width 3072; the
table-driven converter of `common/bfl_keys.py` derives every split from the tensors' shapes instead and works at
any width (the tiny test models included).

The same tables name LoRA modules: the kohya name of a layer is `lora_unet_` + its BFL path with dots
replaced by underscores (`lora_unet_double_blocks_0_img_attn_qkv`), which is what ComfyUI, Forge and
diffusers' kohya-FLUX reader expect.
"""

from __future__ import annotations

import torch

from lorakit.families.common import bfl_keys as common
from lorakit.families.common.bfl_keys import (
    COMFY_PREFIX,
    DOUBLE_PREFIX,
    SINGLE_PREFIX,
    BflTables,
    block_count,
    fused_split_sizes,
    has_key,
    is_bfl_transformer,
    strip_prefix,
)

__all__ = ["COMFY_PREFIX", "DOUBLE_PREFIX", "SINGLE_PREFIX", "TABLES", "block_count", "fused_split_sizes", "has_key", "is_bfl_transformer",
           "strip_prefix", "bfl_to_diffusers", "diffusers_to_bfl", "transformer_config_from_bfl", "lora_targets_by_block"]

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

TABLES = BflTables(TOP_LEVEL, DOUBLE_LAYERS, DOUBLE_NORMS, DOUBLE_FUSED, SINGLE_LAYERS, SINGLE_NORMS, SINGLE_FUSED,
                   final_modulation=FINAL_MODULATION)


def bfl_to_diffusers(state: dict[str, torch.Tensor], source: str = "checkpoint", final_layer: bool = True
                     ) -> dict[str, torch.Tensor]:
    """A BFL-layout FLUX transformer state dict (prefixed or not) in diffusers' FluxTransformer2DModel names
    (without `final_layer`: the blocks and embedders of a ControlNet, which has none)."""
    return common.bfl_to_diffusers(TABLES, state, source, final_layer)


def diffusers_to_bfl(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel weights in BFL names (the layout of `flux1-dev.safetensors`)."""
    return common.diffusers_to_bfl(TABLES, state, prefix)


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


#: sd-scripts' lora_flux layers of one double and one single block: (BFL sub-path, diffusers parts, kind)
DOUBLE_LORA_ROWS = (
    ("img_attn.qkv", DOUBLE_FUSED["img_attn.qkv"], "img_attn"), ("img_attn.proj", ("attn.to_out.0",), "img_attn"),
    ("img_mlp.0", ("ff.net.0.proj",), "img_mlp"), ("img_mlp.2", ("ff.net.2",), "img_mlp"),
    ("img_mod.lin", ("norm1.linear",), "img_mod"),
    ("txt_attn.qkv", DOUBLE_FUSED["txt_attn.qkv"], "txt_attn"), ("txt_attn.proj", ("attn.to_add_out",), "txt_attn"),
    ("txt_mlp.0", ("ff_context.net.0.proj",), "txt_mlp"), ("txt_mlp.2", ("ff_context.net.2",), "txt_mlp"),
    ("txt_mod.lin", ("norm1_context.linear",), "txt_mod"),
)
SINGLE_LORA_ROWS = (
    ("linear1", SINGLE_FUSED["linear1"], "single"), ("linear2", ("proj_out",), "single"),
    ("modulation.lin", ("norm.linear",), "single_mod"),
)


def lora_targets_by_block(num_double: int, num_single: int) -> list[tuple[str, str, tuple[str, ...], str]]:
    """(kohya name, BFL path, diffusers paths, kind) for every LoRA-able block layer, as sd-scripts' lora_flux.

    `kind` selects the per-type rank (`img_attn`, `txt_attn`, `img_mlp`, `txt_mlp`, `img_mod`, `txt_mod`,
    `single`, `single_mod`); fused BFL layers list several diffusers layers.
    """
    return common.block_lora_rows(DOUBLE_LORA_ROWS, SINGLE_LORA_ROWS, num_double, num_single)


# `in_dims` order in sd-scripts: img, time, vector, guidance, txt.
EMBEDDER_GROUPS = (
    ("img_in",), ("time_in.in_layer", "time_in.out_layer"), ("vector_in.in_layer", "vector_in.out_layer"),
    ("guidance_in.in_layer", "guidance_in.out_layer"), ("txt_in",),
)


def embedder_kohya_name(bfl_path: str) -> str:
    return common.kohya_name(bfl_path)
