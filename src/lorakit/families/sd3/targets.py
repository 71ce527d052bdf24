"""`networks.lora_sd3`'s layers on diffusers' SD3Transformer2DModel, named and shaped as the SAI layers they stand for."""

from __future__ import annotations

import torch

from lorakit.adapters.targets import AdapterTarget
from lorakit.families.common.layers import FusedLinearView
from lorakit.families.sd3 import sai_keys
from lorakit.families.sd3.layers import SplitQKVView, SwappedRowsView
from lorakit.families.sd3.network_args import SD3NetworkArgs


def mmdit_targets(transformer: torch.nn.Module, args: SD3NetworkArgs, alpha: float | None) -> list[AdapterTarget]:
    """`networks.lora_sd3`'s targets on diffusers' SD3Transformer2DModel, named and shaped as SAI layers."""
    targets: list[AdapterTarget] = []
    for layer in sai_keys.lora_layers(dict(transformer.config)):
        if layer.lora_kind == "emb":
            dims = args.emb_dims or ()
            slot = sai_keys.emb_slot(layer.sai)
            rank = dims[slot] if slot < len(dims) else 0
        else:
            rank = args.rank_for(layer.lora_kind, layer.block)
        if not rank:
            continue
        modules = [transformer.get_submodule(path) for path in layer.diffusers]
        layer_alpha = alpha or float(rank)
        if len(modules) > 1 and args.split_qkv:
            # one LoRA per q/k/v, saved block-diagonally at rank 3r; alpha 3α keeps each part's scale α/r
            module, rank, layer_alpha = SplitQKVView(modules), 3 * rank, 3 * layer_alpha
        elif len(modules) > 1:
            module = FusedLinearView(modules)
        elif layer.swapped:
            module = SwappedRowsView(modules[0])
        else:
            module = modules[0]
        targets.append(AdapterTarget(sai_keys.kohya_name(layer.sai), module, "unet", rank, layer_alpha))
    return targets

