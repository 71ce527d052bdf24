"""Extract a LoRA from a base model and a tuned model by SVD of their weight differences
(sd-scripts' `networks/extract_lora_from_models.py`).

The modules are exactly those the family's trainer targets (`adapter_targets`, via `tools.targets`), so an extracted file has the
same kohya names as a trained one. For each, ΔW = W_tuned − W_org is factorised with the truncated SVD at
`dim` (3x3 convs at `conv_dim`, only when given) and stored with alpha = rank, i.e. scale 1. Singular values
go with the up factor; both factors are clipped at the `clamp_quantile` of their absolute values as
sd-scripts does (1.0 turns the clipping off and makes the extraction the best rank-r approximation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lorakit.errors import CheckpointError
from lorakit.families.base import Components, ModelFamily
from lorakit.tools.lora_state import LoraFactors
from lorakit.tools.svd import factorise
from lorakit.tools.targets import model_targets

__all__ = ["ExtractOptions", "extract_lora"]

logger = logging.getLogger("lorakit.tools")


@dataclass
class ExtractOptions:
    """The sizes and thresholds of an extraction (sd-scripts' defaults)."""

    dim: int = 4
    conv_dim: int | None = None
    clamp_quantile: float = 0.99
    min_diff: float = 0.01
    device: str | None = None
    fast_svd: bool = False  # randomized SVD of each ΔW (see tools/svd.py): several times faster, near-optimal


def _target_args(options: ExtractOptions) -> dict[str, str]:
    """The `--network_args` whose targets a trained LoRA of the family has (3x3 convs only with conv_dim, in the
    families that have them)."""
    if options.conv_dim:
        return {"conv_dim": str(options.conv_dim), "conv_alpha": str(options.conv_dim)}
    return {}


def _difference(name: str, original: torch.Tensor, tuned: torch.Tensor, device: str | None) -> torch.Tensor:
    if original.shape != tuned.shape:
        raise CheckpointError(
            f"--model_tuned: weight of {name} has shape {tuple(tuned.shape)} but --model_org has {tuple(original.shape)}; "
            "the two models are not the same architecture"
        )
    return tuned.to(device=device, dtype=torch.float32) - original.to(device=device, dtype=torch.float32)


@torch.no_grad()
def extract_lora(
    original: Components, tuned: Components, family: ModelFamily, options: ExtractOptions
) -> dict[str, LoraFactors]:
    """The LoRA modules that carry `original` towards `tuned` (float32, CPU).

    The modules are the family's training targets (`tools.targets`), read in the file's shape and row order,
    so fused layers (q/k/v) get one factor pair each, as kohya files have. The text-encoder part is dropped, as
    in sd-scripts, when no text-encoder weight moved by more than `min_diff` (the encoder was not trained).
    """
    args = _target_args(options)
    modules: dict[str, LoraFactors] = {}
    with model_targets(family, original, args) as org, model_targets(family, tuned, args) as tun:
        for name in org:
            if name not in tun:
                raise CheckpointError(f"--model_tuned has no layer {name}; the two models are not the same architecture")
        # one ΔW at a time: holding every layer's difference at once would add a third model's worth of memory
        text_moved = any(
            float(_difference(name, target.weight(), tun[name].weight(), options.device).abs().max()) > options.min_diff
            for name, target in org.items() if target.component != "unet"
        )
        if not text_moved:
            logger.info("the text encoders differ by at most %g: extracting the U-Net only", options.min_diff)
        for name, target in org.items():
            if target.component != "unet" and not text_moved:
                continue
            delta = _difference(name, target.weight(), tun[name].weight(), options.device)
            spatial = delta.dim() == 4 and tuple(delta.shape[2:]) != (1, 1)
            rank = min(options.conv_dim if spatial else options.dim, delta.shape[0], delta.shape[1])
            result = factorise(delta, rank, clamp_quantile=options.clamp_quantile, randomized=options.fast_svd)
            modules[name] = LoraFactors(name, result.down.cpu(), result.up.cpu(), float(result.rank))
    return modules
