"""Chroma's transformer weights: the original layout (`Chroma1-HD.safetensors`, BFL's FLUX.1 names) <-> diffusers'.

Chroma is FLUX.1 with the per-block modulation layers pruned: every block takes its shift/scale/gate vectors from
one small MLP, the `distilled_guidance_layer` (diffusers' `ChromaApproximator`), fed the timestep and each
vector's index. So its blocks hold FLUX.1's layers without `img_mod`, `txt_mod` and `modulation` (fused q/k/v,
fused single-block `linear1` = [to_q; to_k; to_v; proj_mlp]), there is no `time_in`, `vector_in` or
`guidance_in`, and the final layer has no modulation of its own. The approximator's layers are renamed one to one
(`layers.N.in_layer` -> `layers.N.linear_1`, its RMSNorms' `.scale` -> `.weight`).

LoRA names are sd-scripts' `networks.lora_flux` names on these layers (`lora_unet_double_blocks_0_img_attn_qkv`),
which ComfyUI maps by the weight path and diffusers' kohya FLUX reader splits.
"""

from __future__ import annotations

import torch

from lorakit.errors import CheckpointError
from lorakit.families.common import bfl_keys as common
from lorakit.families.common.bfl_keys import (
    DOUBLE_FUSED,
    DOUBLE_NORMS,
    SINGLE_FUSED,
    SINGLE_NORMS,
    BflTables,
    block_count,
    strip_prefix,
)

APPROXIMATOR = "distilled_guidance_layer"
TOP_LEVEL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "final_layer.linear": "proj_out",
    f"{APPROXIMATOR}.in_proj": f"{APPROXIMATOR}.in_proj",
    f"{APPROXIMATOR}.out_proj": f"{APPROXIMATOR}.out_proj",
}
DOUBLE_LAYERS = {
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
SINGLE_LAYERS = {"linear2": "proj_out"}

#: sd-scripts' lora_flux layers of one Chroma block: (BFL sub-path, diffusers parts, per-type rank kind)
DOUBLE_LORA_ROWS = (
    ("img_attn.qkv", DOUBLE_FUSED["img_attn.qkv"], "img_attn"), ("img_attn.proj", ("attn.to_out.0",), "img_attn"),
    ("img_mlp.0", ("ff.net.0.proj",), "img_mlp"), ("img_mlp.2", ("ff.net.2",), "img_mlp"),
    ("txt_attn.qkv", DOUBLE_FUSED["txt_attn.qkv"], "txt_attn"), ("txt_attn.proj", ("attn.to_add_out",), "txt_attn"),
    ("txt_mlp.0", ("ff_context.net.0.proj",), "txt_mlp"), ("txt_mlp.2", ("ff_context.net.2",), "txt_mlp"),
)
SINGLE_LORA_ROWS = (("linear1", SINGLE_FUSED["linear1"], "single"), ("linear2", ("proj_out",), "single"))
#: `in_dims` as sd-scripts reads it (img, time, vector, guidance, txt); Chroma has only the first and the last
EMBEDDER_GROUPS = (("img_in",), (), (), (), ("txt_in",))
REAL_AXES_DIMS_ROPE = (16, 56, 56)


def approximator_layers(state: dict[str, torch.Tensor], prefix: str = f"{APPROXIMATOR}.layers") -> int:
    return block_count(state, prefix)


def tables(num_approximator_layers: int) -> BflTables:
    """The tables of a Chroma transformer whose approximator has that many layers."""
    top = dict(TOP_LEVEL)
    renames = {}
    for index in range(num_approximator_layers):
        layer = f"{APPROXIMATOR}.layers.{index}"
        top[f"{layer}.in_layer"] = f"{layer}.linear_1"
        top[f"{layer}.out_layer"] = f"{layer}.linear_2"
        renames[f"{APPROXIMATOR}.norms.{index}.scale"] = f"{APPROXIMATOR}.norms.{index}.weight"
    return BflTables(top, DOUBLE_LAYERS, DOUBLE_NORMS, DOUBLE_FUSED, SINGLE_LAYERS, SINGLE_NORMS, SINGLE_FUSED,
                     renames=renames, what="Chroma transformer")


def bfl_to_diffusers(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A Chroma state dict in the original layout (ComfyUI's prefix or none) in ChromaTransformer2DModel names."""
    state = strip_prefix(state)
    return common.bfl_to_diffusers(tables(approximator_layers(state)), state, source)


def diffusers_to_bfl(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """ChromaTransformer2DModel weights in the original layout (what `Chroma1-HD.safetensors` holds)."""
    return common.diffusers_to_bfl(tables(approximator_layers(state)), state, prefix)


def is_chroma_keys(keys) -> bool:
    """Chroma's transformer, in the original or diffusers names: the approximator beside FLUX-style blocks and the
    latent-patch input (`img_in`/`x_embedder`; Chroma Radiance, which works on pixels, has neither)."""
    names = {k.removeprefix(common.COMFY_PREFIX) for k in keys}
    approximator = f"{APPROXIMATOR}.in_proj.weight" in names
    original = "img_in.weight" in names and any(k.startswith("double_blocks.") for k in names)
    diffusers = "x_embedder.weight" in names and any(k.startswith("transformer_blocks.") for k in names)
    return approximator and (original or diffusers)


def transformer_config(state: dict[str, torch.Tensor], source: str) -> dict:
    """The ChromaTransformer2DModel config an original-layout state implies (the RoPE axes are Chroma's own,
    which only fit heads of width 128)."""
    state = strip_prefix(state)
    width, in_channels = state["img_in.weight"].shape
    head_dim = int(state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0])
    if head_dim != sum(REAL_AXES_DIMS_ROPE):
        raise CheckpointError(f"{source}: a Chroma transformer with head width {head_dim} (Chroma has 128) and no "
                              "lorakit.configs metadata; its rotary-embedding axes cannot be inferred")
    hidden, channels = state[f"{APPROXIMATOR}.in_proj.weight"].shape
    return {
        "patch_size": 1, "in_channels": int(in_channels), "out_channels": int(state["final_layer.linear.weight"].shape[0]),
        "num_layers": block_count(state, "double_blocks"), "num_single_layers": block_count(state, "single_blocks"),
        "attention_head_dim": head_dim, "num_attention_heads": int(width // head_dim),
        "joint_attention_dim": int(state["txt_in.weight"].shape[1]), "axes_dims_rope": list(REAL_AXES_DIMS_ROPE),
        "approximator_num_channels": int(channels), "approximator_hidden_dim": int(hidden),
        "approximator_layers": approximator_layers(state),
    }


def lora_rows(num_double: int, num_single: int) -> list[tuple[str, str, tuple[str, ...], str]]:
    """(kohya name, BFL path, diffusers paths, kind) of every block layer a Chroma LoRA may name."""
    return common.block_lora_rows(DOUBLE_LORA_ROWS, SINGLE_LORA_ROWS, num_double, num_single)


def lora_layer_table(num_double: int, num_single: int) -> dict[str, tuple[str, ...]]:
    """kohya name -> the diffusers paths (under the transformer) stacked in it: the blocks and the embedders."""
    table = {name: parts for name, _, parts, _ in lora_rows(num_double, num_single)}
    for group in EMBEDDER_GROUPS:
        for bfl_path in group:
            table[common.kohya_name(bfl_path)] = (TOP_LEVEL[bfl_path],)
    return table
