"""Layer tricks the FLUX family needs on top of diffusers' FluxTransformer2DModel.

`FusedLinearView` (BFL's fused q/k/v and single-block linear1), `SplitQKVView` (`split_qkv=True`) and `to_fp8`
(`--fp8_base`) are shared with SD3 and live in `families/common/layers.py`; `checkpoint_offloading_to_cpu` is `--cpu_offload_checkpointing`.
"""

from __future__ import annotations

import torch

from lorakit.families.common.layers import FP8_DTYPE, Fp8Linear, FusedLinearView, SplitQKVView, to_fp8

__all__ = ["FP8_DTYPE", "Fp8Linear", "FusedLinearView", "SplitQKVView", "to_fp8", "checkpoint_offloading_to_cpu"]


def checkpoint_offloading_to_cpu(function, *args):
    """Gradient checkpointing whose saved block inputs live in (pinned) CPU memory until backward.

    sd-scripts' `--cpu_offload_checkpointing`: the reentrant checkpoint saves its inputs with
    `save_for_backward`, which `save_on_cpu` intercepts. Reentrant checkpointing only back-propagates when
    an input requires grad, so the hidden states are marked as such (the adapters inside need the graph).
    """
    from torch.utils.checkpoint import checkpoint

    args = list(args)
    if isinstance(args[0], torch.Tensor) and not args[0].requires_grad:
        args[0] = args[0].detach().requires_grad_(True)
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpoint(function, *args, use_reentrant=True)
