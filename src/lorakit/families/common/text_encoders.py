"""LoRA targets in the text encoders the families share: CLIP (SD, SDXL, SD3, FLUX) and T5 (SD3, FLUX)."""

from __future__ import annotations

from torch import nn

from lorakit.adapters.targets import (
    AdapterTarget,
    RankChoice,
    clip_path_prefix,
    collect_targets,
)

#: transformers' module classes whose linears LoRA adapts (sd-scripts: attention and MLP)
CLIP_PARENTS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
T5_PARENTS = ("T5Attention", "T5DenseGatedActDense")


def clip_targets(encoder: nn.Module, prefix: str, ranks: RankChoice) -> list[AdapterTarget]:
    """A CLIP text encoder's attention and MLP linears, named with the `text_model` level kohya files keep."""
    return collect_targets(encoder, prefix=prefix, component="text_encoder", parent_classes=CLIP_PARENTS, ranks=ranks,
                           path_prefix=clip_path_prefix(encoder))


def t5_targets(encoder: nn.Module, prefix: str, ranks: RankChoice) -> list[AdapterTarget]:
    return collect_targets(encoder, prefix=prefix, component="text_encoder", parent_classes=T5_PARENTS, ranks=ranks)
