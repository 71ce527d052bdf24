"""Layer tricks the FLUX family needs on top of diffusers' FluxTransformer2DModel.

`FusedLinearView` (BFL's fused q/k/v and single-block linear1), `SplitQKVView` (`split_qkv=True`) and `to_fp8`
(`--fp8_base`) are shared with SD3 and live in `families/common/layers.py`; `checkpoint_offloading_to_cpu`
(`--cpu_offload_checkpointing`) too.
"""

from __future__ import annotations

from lorakit.families.common.layers import FP8_DTYPE, Fp8Linear, FusedLinearView, SplitQKVView, checkpoint_offloading_to_cpu, to_fp8

__all__ = ["FP8_DTYPE", "Fp8Linear", "FusedLinearView", "SplitQKVView", "to_fp8", "checkpoint_offloading_to_cpu"]
