"""FLUX.2 [klein] transformer weights: Black Forest Labs' layout (`flux2-klein-base-4b.safetensors`) <-> diffusers'.

FLUX.2 keeps FLUX.1's block names but not its layers: no biases, SwiGLU MLPs (`img_mlp.0` holds gate and value),
one modulation per stream shared by all blocks (`double_stream_modulation_img/txt`, `single_stream_modulation`)
instead of one per block, and a single block's `linear1` is one diffusers layer too (`attn.to_qkv_mlp_proj`). Only
the double blocks' q/k/v are fused in BFL files and apart in diffusers'.

LoRA names are those of musubi-tuner's `networks.lora_flux_2` (the BFL layers of the blocks, modulation excluded:
`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`), which ComfyUI maps by the weight
path and diffusers' kohya FLUX.2 reader converts.
"""

from __future__ import annotations

import torch

from lorakit.families.common import bfl_keys as common
from lorakit.families.common.bfl_keys import (
    DOUBLE_FUSED,
    DOUBLE_NORMS,
    SINGLE_NORMS,
    BflTables,
    block_count,
    has_key,
    strip_prefix,
)

TOP_LEVEL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
}
FINAL_MODULATION = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # (shift, scale) in BFL, swapped in diffusers
DOUBLE_LAYERS = {
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
SINGLE_LAYERS = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}
TABLES = BflTables(TOP_LEVEL, DOUBLE_LAYERS, DOUBLE_NORMS, DOUBLE_FUSED, SINGLE_LAYERS, SINGLE_NORMS, {},
                   final_modulation=FINAL_MODULATION, leaves=("weight",), what="FLUX.2 transformer")

#: networks.lora_flux_2's layers of one block: (BFL sub-path, diffusers parts, per-type rank kind)
DOUBLE_LORA_ROWS = (
    ("img_attn.qkv", DOUBLE_FUSED["img_attn.qkv"], "img_attn"), ("img_attn.proj", ("attn.to_out.0",), "img_attn"),
    ("img_mlp.0", ("ff.linear_in",), "img_mlp"), ("img_mlp.2", ("ff.linear_out",), "img_mlp"),
    ("txt_attn.qkv", DOUBLE_FUSED["txt_attn.qkv"], "txt_attn"), ("txt_attn.proj", ("attn.to_add_out",), "txt_attn"),
    ("txt_mlp.0", ("ff_context.linear_in",), "txt_mlp"), ("txt_mlp.2", ("ff_context.linear_out",), "txt_mlp"),
)
SINGLE_LORA_ROWS = (("linear1", ("attn.to_qkv_mlp_proj",), "single"), ("linear2", ("attn.to_out",), "single"))
#: `in_dims` (img, time, vector, guidance, txt): FLUX.2 has no pooled vector
EMBEDDER_GROUPS = (("img_in",), ("time_in.in_layer", "time_in.out_layer"), (), ("guidance_in.in_layer", "guidance_in.out_layer"),
                   ("txt_in",))
MARKERS = ("double_stream_modulation_img.lin.weight", "single_stream_modulation.lin.weight")
DIFFUSERS_MARKER = "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight"
REAL_AXES_DIMS_ROPE = (32, 32, 32, 32)


def bfl_to_diffusers(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A BFL-layout FLUX.2 state dict (ComfyUI's prefix or none) in Flux2Transformer2DModel names."""
    return common.bfl_to_diffusers(TABLES, state, source)


def diffusers_to_bfl(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Flux2Transformer2DModel weights in BFL names (what `flux2-klein-base-4b.safetensors` holds)."""
    return common.diffusers_to_bfl(TABLES, state, prefix)


def is_flux2_keys(keys) -> bool:
    """A FLUX.2 transformer in BFL names (its shared stream modulations) or diffusers' (a single block's fused
    `to_qkv_mlp_proj`)."""
    return any(has_key(keys, marker) for marker in MARKERS) or DIFFUSERS_MARKER in keys


def transformer_config(state: dict[str, torch.Tensor]) -> dict:
    """The Flux2Transformer2DModel config a BFL state implies (FLUX.2's RoPE axes, 4 × 32)."""
    state = strip_prefix(state)
    width, in_channels = state["img_in.weight"].shape
    head_dim = int(state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0])
    mlp_hidden = int(state["double_blocks.0.img_mlp.2.weight"].shape[1])
    return {
        "patch_size": 1, "in_channels": int(in_channels), "out_channels": int(state["final_layer.linear.weight"].shape[0]),
        "num_layers": block_count(state, "double_blocks"), "num_single_layers": block_count(state, "single_blocks"),
        "attention_head_dim": head_dim, "num_attention_heads": int(width // head_dim),
        "joint_attention_dim": int(state["txt_in.weight"].shape[1]),
        "timestep_guidance_channels": int(state["time_in.in_layer.weight"].shape[1]), "mlp_ratio": mlp_hidden / width,
        "axes_dims_rope": list(REAL_AXES_DIMS_ROPE), "rope_theta": 2000, "eps": 1e-6,
        "guidance_embeds": "guidance_in.in_layer.weight" in state,
    }


def lora_rows(num_double: int, num_single: int) -> list[tuple[str, str, tuple[str, ...], str]]:
    return common.block_lora_rows(DOUBLE_LORA_ROWS, SINGLE_LORA_ROWS, num_double, num_single)


def lora_layer_table(num_double: int, num_single: int) -> dict[str, tuple[str, ...]]:
    """kohya name -> the diffusers paths (under the transformer) stacked in it: the blocks and the embedders."""
    table = {name: parts for name, _, parts, _ in lora_rows(num_double, num_single)}
    for group in EMBEDDER_GROUPS:
        for bfl_path in group:
            table[common.kohya_name(bfl_path)] = (TOP_LEVEL[bfl_path],)
    return table
