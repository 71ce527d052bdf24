"""`networks.lora_flux`'s layers on diffusers' FluxTransformer2DModel, named and shaped as the BFL layers they
stand for (fused q/k/v and single-block linear1 as views over diffusers' separate layers)."""

from __future__ import annotations

import torch

from lorakit.adapters.targets import AdapterTarget
from lorakit.families.common.layers import FusedLinearView, SplitQKVView
from lorakit.families.flux import bfl_keys
from lorakit.families.flux.network_args import FluxNetworkArgs

#: LyCORIS preset classes of BFL's FLUX model: every Linear of the double and single blocks, or the attention
BFL_BLOCK_CLASSES = {"DoubleStreamBlock", "SingleStreamBlock"}
BFL_ATTENTION_CLASS = "SelfAttention"


def transformer_targets(transformer: torch.nn.Module, args: FluxNetworkArgs, alpha: float | None) -> list[AdapterTarget]:
    config = transformer.config
    targets: list[AdapterTarget] = []
    for name, bfl_path, parts, kind in bfl_keys.lora_targets_by_block(config.num_layers, config.num_single_layers):
        rank = args.rank_for(bfl_path, kind)
        if not rank:
            continue
        modules = [transformer.get_submodule(p) for p in parts]
        layer_alpha = alpha or float(rank)
        if len(modules) > 1 and args.split_qkv:
            # one rank-r LoRA per part, saved block-diagonally at rank k·r with alpha k·α: each part keeps α/r
            module, rank, layer_alpha = SplitQKVView(modules), len(modules) * rank, len(modules) * layer_alpha
        else:
            module = modules[0] if len(modules) == 1 else FusedLinearView(modules)
        targets.append(AdapterTarget(name, module, "unet", rank, layer_alpha))
    for group, rank in zip(bfl_keys.EMBEDDER_GROUPS, args.in_dims or ()):
        for bfl_path in group:
            diffusers_path = bfl_keys.TOP_LEVEL[bfl_path]
            if rank and _has_submodule(transformer, diffusers_path):
                module = transformer.get_submodule(diffusers_path)
                targets.append(AdapterTarget(bfl_keys.embedder_kohya_name(bfl_path), module, "unet", rank, alpha or float(rank)))
    return targets


def _has_submodule(root: torch.nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True
