"""Layer tricks the FLUX family needs on top of diffusers' FluxTransformer2DModel.

`FusedLinearView` (BFL's fused q/k/v and single-block linear1), `SplitQKVView` (`split_qkv=True`), `to_fp8`
(`--fp8_base`) and `checkpoint_offloading_to_cpu` (`--cpu_offload_checkpointing`) are shared with the other
transformer families and live in `families/common/layers.py`.
"""

from __future__ import annotations

from lorakit.families.common.layers import (
    FP8_DTYPE,
    Fp8Linear,
    FusedLinearView,
    SplitQKVView,
    checkpoint_offloading_to_cpu,
    to_fp8,
)

__all__ = ["FP8_DTYPE", "Fp8Linear", "FusedLinearView", "SplitQKVView", "to_fp8", "checkpoint_offloading_to_cpu"]
