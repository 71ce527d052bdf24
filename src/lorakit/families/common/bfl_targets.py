"""sd-scripts' `networks.lora_flux` layers on a diffusers model of a BFL-layout transformer (FLUX.1, Chroma, FLUX.2),
named and shaped as the BFL layers they stand for (fused q/k/v and single-block linear1 as views over diffusers'
separate layers)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lorakit.adapters.targets import AdapterTarget
from lorakit.families.common.bfl_keys import kohya_name
from lorakit.families.common.bfl_network_args import BflNetworkArgs
from lorakit.families.common.layers import FusedLinearView, SplitQKVView


def block_targets(transformer: torch.nn.Module, rows: Sequence[tuple[str, str, tuple[str, ...], str]], args: BflNetworkArgs,
                  alpha: float | None) -> list[AdapterTarget]:
    """The block layers of `rows` (`common.bfl_keys.block_lora_rows`) at the ranks `args` give them."""
    targets: list[AdapterTarget] = []
    for name, bfl_path, parts, kind in rows:
        rank = args.rank_for(bfl_path, kind, name)
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
    return targets


def embedder_targets(transformer: torch.nn.Module, groups: Sequence[tuple[str, ...]], top_level: Mapping[str, str],
                     args: BflNetworkArgs, alpha: float | None) -> list[AdapterTarget]:
    """`in_dims`: the input embedders of each group at its rank (or the one network_reg_dims gives them), where
    the model has them."""
    targets: list[AdapterTarget] = []
    for group, group_rank in zip(groups, args.in_dims or ()):
        for bfl_path in group:
            diffusers_path = top_level[bfl_path]
            name = kohya_name(bfl_path)
            chosen = args.reg_rank(name)
            rank = group_rank if chosen is None else chosen
            if rank and _has_submodule(transformer, diffusers_path):
                module = transformer.get_submodule(diffusers_path)
                targets.append(AdapterTarget(name, module, "unet", rank, alpha or float(rank)))
    return targets


def reg_ranked(targets: Sequence[AdapterTarget], args: BflNetworkArgs, alpha: float | None) -> list[AdapterTarget]:
    """Text-encoder targets with the ranks network_reg_dims gives them by name (0 drops one; alpha stays
    --network_alpha, or the rank without it)."""
    ranked: list[AdapterTarget] = []
    for target in targets:
        rank = args.reg_rank(target.name)
        if rank is None:
            ranked.append(target)
        elif rank:
            ranked.append(AdapterTarget(target.name, target.module, target.component, rank, alpha or float(rank)))
    return ranked


def _has_submodule(root: torch.nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True
