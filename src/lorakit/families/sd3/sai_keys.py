"""SD3 / SD3.5 MMDiT weights: Stability AI's layout (`sd3_medium.safetensors`) <-> diffusers', as data.

The SAI MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers", arXiv:2403.03206, §4) stores each
joint block as an `x_block` (image stream) and a `context_block` (text stream), each with a fused
`attn.qkv`, `attn.proj`, `mlp.fc1/fc2` and `adaLN_modulation.1`; SD3.5 adds RMS q/k norms (`ln_q`, `ln_k`) and,
in SD3.5 Medium's first blocks, a second image self-attention `attn2` (MMDiT-X). diffusers keeps q, k and v
apart and, in two places, stores the two halves of a modulation in the other order: the final layer and the
last block's text stream (which only modulates its attention input, "context_pre_only") are (shift, scale) in
SAI files and (scale, shift) in diffusers.

One table (`layer_table`) lists every layer with its SAI path, the diffusers layers stacked in it and whether
its halves are swapped. The weight converters and the LoRA targets (`lora_unet_<SAI path with _>`, the names
ComfyUI and sd-scripts' `networks.lora_sd3` use) are both read off it, so they cannot disagree. Every split is
derived from tensor shapes, so the tables work at any width, the tiny test models included.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.errors import CheckpointError

SAI_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Text encoders inside SAI single files ("incl_clips" / "incl_clips_t5xxl"), in transformers' layout.
TE_PREFIXES = {
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}
HEAD_DIM = 64  # every released SD3/3.5 MMDiT uses 64-wide heads


@dataclass(frozen=True)
class Layer:
    """One SAI layer: its path, the diffusers layers stacked in it (in order), and its kind.

    `kind` is "linear" (weight and bias), "conv" (the patch embedding), "norm" (weight only) or "tensor" (a bare
    parameter); `swapped` marks the modulations whose two halves are stored in the other order; `lora_kind`
    names the per-type rank option that covers it (`x_attn`, `context_mlp`, …) or an `emb_dims` slot.
    """

    sai: str
    diffusers: tuple[str, ...]
    kind: str = "linear"
    swapped: bool = False
    lora_kind: str | None = None
    block: int | None = None


EMBEDDERS = (  # emb_dims order in sd-scripts: context_embedder, t_embedder, x_embedder, y_embedder, final_mod, final_linear
    ("context_embedder", ("context_embedder",), "linear", False),
    ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), "linear", False),
    ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), "linear", False),
    ("x_embedder.proj", ("pos_embed.proj",), "conv", False),
    ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",), "linear", False),
    ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",), "linear", False),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",), "linear", True),
    ("final_layer.linear", ("proj_out",), "linear", False),
)
EMB_SLOTS = ("context_embedder", "t_embedder", "x_embedder", "y_embedder", "final_layer.adaLN_modulation", "final_layer.linear")


def emb_slot(sai_path: str) -> int:
    """The `emb_dims` index that covers a top-level layer."""
    for index, slot in enumerate(EMB_SLOTS):
        if sai_path.startswith(slot):
            return index
    raise KeyError(sai_path)


def _block_layers(i: int, last: bool, dual: bool, qk_norm: bool) -> list[Layer]:
    p, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
    layers = [
        Layer(x + "attn.qkv", (p + "attn.to_q", p + "attn.to_k", p + "attn.to_v"), lora_kind="x_attn", block=i),
        Layer(x + "attn.proj", (p + "attn.to_out.0",), lora_kind="x_attn", block=i),
        Layer(x + "mlp.fc1", (p + "ff.net.0.proj",), lora_kind="x_mlp", block=i),
        Layer(x + "mlp.fc2", (p + "ff.net.2",), lora_kind="x_mlp", block=i),
        Layer(x + "adaLN_modulation.1", (p + "norm1.linear",), lora_kind="x_mod", block=i),
        Layer(c + "attn.qkv", (p + "attn.add_q_proj", p + "attn.add_k_proj", p + "attn.add_v_proj"), lora_kind="context_attn", block=i),
        Layer(c + "adaLN_modulation.1", (p + "norm1_context.linear",), swapped=last, lora_kind="context_mod", block=i),
    ]
    if not last:  # the last text stream only feeds the final attention: no output projection, no MLP
        layers += [
            Layer(c + "attn.proj", (p + "attn.to_add_out",), lora_kind="context_attn", block=i),
            Layer(c + "mlp.fc1", (p + "ff_context.net.0.proj",), lora_kind="context_mlp", block=i),
            Layer(c + "mlp.fc2", (p + "ff_context.net.2",), lora_kind="context_mlp", block=i),
        ]
    if dual:
        layers += [
            Layer(x + "attn2.qkv", (p + "attn2.to_q", p + "attn2.to_k", p + "attn2.to_v"), lora_kind="x_attn", block=i),
            Layer(x + "attn2.proj", (p + "attn2.to_out.0",), lora_kind="x_attn", block=i),
        ]
    if qk_norm:
        norms = {x + "attn.ln_q": p + "attn.norm_q", x + "attn.ln_k": p + "attn.norm_k",
                 c + "attn.ln_q": p + "attn.norm_added_q", c + "attn.ln_k": p + "attn.norm_added_k"}
        if dual:
            norms.update({x + "attn2.ln_q": p + "attn2.norm_q", x + "attn2.ln_k": p + "attn2.norm_k"})
        layers += [Layer(s, (d,), "norm") for s, d in norms.items()]
    return layers


def layer_table(config: dict[str, Any]) -> list[Layer]:
    """Every layer of an SD3Transformer2DModel with this diffusers config, in a stable order."""
    num_layers = int(config["num_layers"])
    dual = set(config.get("dual_attention_layers") or ())
    qk_norm = bool(config.get("qk_norm"))
    layers = [Layer("pos_embed", ("pos_embed.pos_embed",), "tensor")]
    layers += [Layer(s, d, kind, swapped, lora_kind="emb") for s, d, kind, swapped in EMBEDDERS]
    for i in range(num_layers):
        layers += _block_layers(i, i == num_layers - 1, i in dual, qk_norm)
    return layers


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(a; b) -> (b; a) along the first axis: SAI (shift, scale) <-> diffusers (scale, shift)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def suffixes(kind: str) -> tuple[str, ...]:
    return {"tensor": ("",), "norm": (".weight",)}.get(kind, (".weight", ".bias"))


# ---------------------------------------------------------------------------------------------------------
# Weight conversion
# ---------------------------------------------------------------------------------------------------------


def diffusers_to_sai(state: dict[str, torch.Tensor], config: dict[str, Any], prefix: str = SAI_PREFIX) -> dict[str, torch.Tensor]:
    """A diffusers SD3 transformer state dict in SAI layout (fused qkv, original modulation order)."""
    out: dict[str, torch.Tensor] = {}
    for layer in layer_table(config):
        for suffix in suffixes(layer.kind):
            parts = [state[d + suffix] for d in layer.diffusers]
            value = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            out[prefix + layer.sai + suffix] = swap_halves(value) if layer.swapped else value
    return out


def sai_to_diffusers(state: dict[str, torch.Tensor], config: dict[str, Any], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """SAI MMDiT tensors (prefix already stripped) in diffusers' layout; a missing tensor names the file."""
    out: dict[str, torch.Tensor] = {}
    for layer in layer_table(config):
        for suffix in suffixes(layer.kind):
            key = layer.sai + suffix
            if key not in state:
                raise CheckpointError(f"{source}: the SD3 transformer weight {key} is missing; is the file complete?")
            value = swap_halves(state[key]) if layer.swapped else state[key]
            chunks = value.chunk(len(layer.diffusers), dim=0) if len(layer.diffusers) > 1 else (value,)
            for name, chunk in zip(layer.diffusers, chunks):
                out[name + suffix] = chunk.contiguous()
    return out


def strip_transformer_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MMDiT tensors of an SAI file, without `model.diffusion_model.` (files without it pass through)."""
    if any(k.startswith(SAI_PREFIX) for k in state):
        return {k[len(SAI_PREFIX):]: v for k, v in state.items() if k.startswith(SAI_PREFIX)}
    return {k: v for k, v in state.items() if not k.startswith((VAE_PREFIX, "text_encoders."))}


def is_sai_transformer(keys: Any) -> bool:
    return any("joint_blocks.0.x_block.attn.qkv.weight" in k for k in keys)


def transformer_config_from_sai(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, Any]:
    """The diffusers config of an SAI MMDiT, read off its tensor shapes (64-wide heads, as every release)."""
    try:
        blocks = {int(m[1]) for k in state if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
        patch_weight = state["x_embedder.proj.weight"]
        hidden, in_channels, patch = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[2]
        pos_rows = state["pos_embed"].shape[1]
        config = {
            "_class_name": "SD3Transformer2DModel",
            "sample_size": 128,
            "patch_size": int(patch),
            "in_channels": int(in_channels),
            "num_layers": len(blocks),
            "attention_head_dim": HEAD_DIM,
            "num_attention_heads": hidden // HEAD_DIM,
            "joint_attention_dim": int(state["context_embedder.weight"].shape[1]),
            "caption_projection_dim": int(hidden),
            "pooled_projection_dim": int(state["y_embedder.mlp.0.weight"].shape[1]),
            "out_channels": int(state["final_layer.linear.weight"].shape[0] // (patch * patch)),
            "pos_embed_max_size": int(math.isqrt(pos_rows)),
            "dual_attention_layers": sorted({int(m[1]) for k in state if (m := re.match(r"joint_blocks\.(\d+)\.x_block\.attn2\.", k))}),
            "qk_norm": "rms_norm" if any(".ln_q." in k for k in state) else None,
        }
    except KeyError as exc:
        raise CheckpointError(f"{source}: not an SD3 MMDiT (no {exc.args[0]})") from None
    return config


def model_type(config: dict[str, Any]) -> str:
    """sd-scripts' SD3 model type: q/k norms mean 3.5, a second attention 3.5 Medium (MMDiT-X)."""
    if config.get("qk_norm"):
        return "5-medium" if config.get("dual_attention_layers") else "5-large"
    return "medium"


# ---------------------------------------------------------------------------------------------------------
# LoRA names
# ---------------------------------------------------------------------------------------------------------


def kohya_name(sai_path: str) -> str:
    """`joint_blocks.0.x_block.attn.qkv` -> `lora_unet_joint_blocks_0_x_block_attn_qkv`."""
    return "lora_unet_" + sai_path.replace(".", "_")


def lora_layers(config: dict[str, Any]) -> list[Layer]:
    """The layers `networks.lora_sd3` can adapt (linears and the patch convolution; no norms)."""
    return [layer for layer in layer_table(config) if layer.kind in ("linear", "conv")]
