"""Change the rank of a LoRA by SVD (sd-scripts' `networks/resize_lora.py`), to a fixed or a dynamic rank.

Each module's ΔW/scale = up·down is re-factorised with the truncated SVD; the new alpha is scale·new_rank, so
the stored scale alpha/rank stays what it was and ΔW keeps its magnitude. At a rank no smaller than the
original the result is the same ΔW (lossless up to float rounding); below it, the largest singular values
are kept, which is the best approximation in the Frobenius norm.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch

from lorakit.tools.common import uniform_value
from lorakit.tools.lora_state import LoraFactors
from lorakit.tools.svd import DYNAMIC_METHODS, factorise_product

__all__ = ["ResizeReport", "resize_metadata", "resize_modules"]

logger = logging.getLogger("lorakit.tools")


@dataclass
class ResizeReport:
    """Per module: (old rank, new rank) and the share of ‖ΔW‖_F kept."""

    ranks: dict[str, tuple[int, int]] = field(default_factory=dict)
    fro_retained: dict[str, float] = field(default_factory=dict)

    def mean_fro_retained(self) -> float:
        values = list(self.fro_retained.values())
        return sum(values) / len(values) if values else 1.0


def resize_modules(
    modules: dict[str, LoraFactors],
    new_rank: int,
    *,
    new_conv_rank: int | None = None,
    dynamic_method: str | None = None,
    dynamic_param: float | None = None,
    device: str | torch.device | None = None,
    verbose: bool = False,
) -> tuple[dict[str, LoraFactors], ResizeReport]:
    """The modules at their new ranks (float32, CPU) and a report.

    `new_rank` is the rank (or, with a dynamic method, the largest rank) for linears and 1x1 convs,
    `new_conv_rank` (default `new_rank`) for 3x3 convs. A rank is never raised above the module's own.
    """
    if new_rank < 1 or (new_conv_rank is not None and new_conv_rank < 1):
        raise ValueError("new ranks must be at least 1")
    if dynamic_method is not None and dynamic_method not in DYNAMIC_METHODS:
        raise ValueError(f"dynamic_method must be one of {DYNAMIC_METHODS}")
    conv_rank = new_conv_rank or new_rank
    resized: dict[str, LoraFactors] = {}
    report = ResizeReport()
    for name, module in modules.items():
        limit = conv_rank if module.is_spatial else new_rank
        result = factorise_product(
            module.down.to(device=device), module.up.to(device=device), min(limit, module.rank),
            method=dynamic_method, param=dynamic_param, collapse_zero=True,
        )
        rank = result.rank
        # alpha' = scale · r' keeps alpha'/r' = scale, so (alpha'/r') · up'·down' = scale · (up·down)_r'
        resized[name] = LoraFactors(name, result.down.cpu(), result.up.cpu(), module.scale * rank)
        report.ranks[name] = (module.rank, rank)
        report.fro_retained[name] = result.fro_retained()
        if verbose:
            s = result.singular_values
            ratio = float(s[0] / s[rank - 1]) if float(s[rank - 1]) > 0 else float("inf")
            logger.info(
                "%s: rank %d -> %d, Frobenius norm kept %.1f%%, S0/S_r %.1f",
                name, module.rank, rank, 100 * report.fro_retained[name], ratio,
            )
    if verbose:
        logger.info("average Frobenius norm kept: %.1f%%", 100 * report.mean_fro_retained())
    return resized, report


def resize_metadata(
    metadata: dict[str, str],
    modules: dict[str, LoraFactors],
    report: ResizeReport,
    *,
    dynamic_method: str | None,
    dynamic_param: float | str | None,
) -> dict[str, str]:
    """The input file's metadata with the new dims, alphas and a note in `ss_training_comment`."""
    updated = dict(metadata)
    old_dim = metadata.get("ss_network_dim", uniform_value([old for old, _ in report.ranks.values()]))
    plain = [m for m in modules.values() if not m.is_spatial] or list(modules.values())
    new_dim = uniform_value([m.rank for m in plain])
    if dynamic_method:
        note = f"Dynamic resize with {dynamic_method}: {dynamic_param} from {old_dim}"
        new_dim = "Dynamic"
    else:
        note = f"dimension is resized from {old_dim} to {new_dim}"
    comment = metadata.get("ss_training_comment")
    updated["ss_training_comment"] = f"{note}; {comment}" if comment else note
    updated["ss_network_dim"] = new_dim
    updated["ss_network_alpha"] = "Dynamic" if dynamic_method else uniform_value([m.alpha_value for m in plain])
    spatial = [m for m in modules.values() if m.is_spatial]
    if spatial and "ss_network_args" in metadata:
        try:
            args = json.loads(metadata["ss_network_args"])
        except ValueError:
            args = None
        if isinstance(args, dict):
            args["conv_dim"] = "Dynamic" if dynamic_method else uniform_value([m.rank for m in spatial])
            args["conv_alpha"] = "Dynamic" if dynamic_method else uniform_value([m.alpha_value for m in spatial])
            updated["ss_network_args"] = json.dumps(args)
    return updated
