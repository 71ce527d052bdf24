"""`networks.lora_flux`'s layers on diffusers' FluxTransformer2DModel, named and shaped as the BFL layers they
stand for (fused q/k/v and single-block linear1 as views over diffusers' separate layers; `common/bfl_targets.py`)."""

from __future__ import annotations

import torch

from lorakit.adapters.targets import AdapterTarget
from lorakit.families.common.bfl_targets import block_targets, embedder_targets
from lorakit.families.flux import bfl_keys
from lorakit.families.flux.network_args import FluxNetworkArgs

#: LyCORIS preset classes of BFL's FLUX model: every Linear of the double and single blocks, or the attention
BFL_BLOCK_CLASSES = {"DoubleStreamBlock", "SingleStreamBlock"}
BFL_ATTENTION_CLASS = "SelfAttention"


def transformer_targets(transformer: torch.nn.Module, args: FluxNetworkArgs, alpha: float | None) -> list[AdapterTarget]:
    config = transformer.config
    rows = bfl_keys.lora_targets_by_block(config.num_layers, config.num_single_layers)
    return (block_targets(transformer, rows, args, alpha)
            + embedder_targets(transformer, bfl_keys.EMBEDDER_GROUPS, bfl_keys.TOP_LEVEL, args, alpha))
