"""The layers an adapter attaches to (`AdapterTarget`), found and named the way kohya-format files name them.

A kohya module name is `<prefix>_<module path with every "." replaced by "_">`, for example
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`. Loaders in ComfyUI, Forge,
diffusers and sd-scripts rebuild the model path from that name, so it must follow the reference model's
module layout exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class AdapterTarget:
    """One layer an adapter attaches to.

    `name` is the kohya module name (e.g. `lora_unet_down_blocks_0_attentions_0_proj_in`), `module` the
    `nn.Linear`/`nn.Conv2d`, `component` is "unet" or "text_encoder" (used for learning-rate groups), and
    `rank`/`alpha` the size chosen for it (LierLa vs C3Lier differ for 3x3 convs).
    """

    name: str
    module: nn.Module
    component: str
    rank: int
    alpha: float


@dataclass(frozen=True)
class RankChoice:
    """Rank and alpha for linear/1x1 layers and, when C3Lier is on, for 3x3 convolutions."""

    rank: int
    alpha: float
    conv_rank: int | None = None
    conv_alpha: float | None = None


def clip_path_prefix(encoder: nn.Module) -> str:
    """The `text_model.` level kohya names of CLIP text-encoder layers carry: transformers 5 dropped it from
    CLIPTextModel, sd-scripts' files (and every loader) keep it."""
    return "" if hasattr(encoder, "text_model") else "text_model."


def kohya_name(prefix: str, module_path: str) -> str:
    return f"{prefix}_{module_path.replace('.', '_')}"


def is_pointwise(module: nn.Module) -> bool:
    """A Linear or a 1x1 convolution: the layers LoRA-LierLa adapts."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def is_spatial_conv(module: nn.Module) -> bool:
    """A convolution with a kernel larger than 1x1: the extra layers LoRA-C3Lier adapts."""
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def collect_targets(
    root: nn.Module,
    *,
    prefix: str,
    component: str,
    parent_classes: tuple[str, ...],
    ranks: RankChoice,
    path_prefix: str = "",
    include_spatial: bool = False,
) -> list[AdapterTarget]:
    """Every pointwise layer (and, with `include_spatial`, every 3x3 conv) inside modules whose class name
    is in `parent_classes`, named after its full path. Each layer is listed once even when parents nest.

    `path_prefix` is prepended to module paths for naming only (e.g. "text_model." because transformers 5
    dropped that level from CLIPTextModel while kohya names still carry it).
    """
    targets: dict[str, AdapterTarget] = {}
    for parent_path, parent in root.named_modules():
        if type(parent).__name__ not in parent_classes:
            continue
        for child_path, child in parent.named_modules():
            if not child_path:
                continue
            full_path = f"{parent_path}.{child_path}" if parent_path else child_path
            target = _target_for(child, kohya_name(prefix, path_prefix + full_path), component, ranks, include_spatial)
            if target is not None:
                targets.setdefault(target.name, target)
    return list(targets.values())


def _target_for(module: nn.Module, name: str, component: str, ranks: RankChoice, include_spatial: bool) -> AdapterTarget | None:
    if is_pointwise(module):
        return AdapterTarget(name, module, component, ranks.rank, ranks.alpha)
    if include_spatial and is_spatial_conv(module) and ranks.conv_rank:
        return AdapterTarget(name, module, component, ranks.conv_rank, ranks.conv_alpha or 1.0)
    return None
