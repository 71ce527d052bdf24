"""The layers `networks.lora_zimage` (musubi-tuner) adapts, under ComfyUI's names: in each of the main `layers`
blocks (not the refiners, not the adaLN modulation) the attention's q/k/v (one fused layer, as ComfyUI holds it),
its output projection and the SwiGLU feed-forward's w1, w2, w3."""

from __future__ import annotations

import re

from torch import nn

from lorakit.adapters.targets import AdapterTarget
from lorakit.families.common.layers import FusedLinearView

ATTENTION = re.compile(r"_attention_(qkv|out)$")


def block_layers(block: nn.Module) -> dict[str, nn.Module]:
    """ComfyUI's name (within the block) of each adapted layer -> the diffusers layer (or fused view)."""
    attention = block.attention
    return {
        "attention.qkv": FusedLinearView([attention.to_q, attention.to_k, attention.to_v]),
        "attention.out": attention.to_out[0],
        "feed_forward.w1": block.feed_forward.w1,
        "feed_forward.w2": block.feed_forward.w2,
        "feed_forward.w3": block.feed_forward.w3,
    }


def transformer_targets(transformer: nn.Module, rank: int, alpha: float | None) -> list[AdapterTarget]:
    targets = []
    for index, block in enumerate(transformer.layers):
        for path, module in block_layers(block).items():
            name = f"lora_unet_layers_{index}_{path.replace('.', '_')}"
            targets.append(AdapterTarget(name, module, "unet", rank, alpha or float(rank)))
    return targets
