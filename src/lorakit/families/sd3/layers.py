"""Stand-ins that let a standard LoRA module attach to SAI-layout layers of diffusers' SD3 transformer.

kohya-format SD3 LoRAs are shaped after the SAI MMDiT: one factor pair per fused `attn.qkv`, and modulations in
SAI's half order. diffusers' model keeps q/k/v apart and stores two modulations as (scale, shift). These views
stand for the SAI layer, so the adapter's tensors have exactly the shapes (and row order) of the file:

* `FusedLinearView` (shared with FLUX, in `families/common/layers.py`) stacks q, k and v;
* `SwappedRowsView` presents one Linear with its two output halves exchanged;
* `SplitQKVView` (shared with FLUX, in `families/common/layers.py`) is a fused view whose adapter trains three
  independent rank-r LoRAs (sd-scripts' `split_qkv=True`): the adapter is built at rank 3r with its up matrix
  kept block-diagonal (gradients outside the q/k/v blocks are zeroed as it attaches), which is exactly the
  block-diagonal form sd-scripts saves.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.adapters.base import dequantized
from lorakit.families.common.layers import SplitQKVView
from lorakit.families.sd3.sai_keys import swap_halves

__all__ = ["SplitQKVView", "SwappedRowsView"]  # SplitQKVView lives with the other shared views


class SwappedRowsView(nn.Linear):
    """A weightless stand-in for `part` with its output halves swapped; its forward is the adapter's delta."""

    def __init__(self, part: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = part.in_features, part.out_features
        self.bias = None
        object.__setattr__(self, "parts", [part])
        inner = part.__dict__.get("forward", part.forward)
        view = self

        def forward(x: torch.Tensor) -> torch.Tensor:
            out = inner(x)
            delta = view(x)
            return out if delta.ndim == 0 else out + swap_halves(delta.movedim(-1, 0)).movedim(0, -1).to(out.dtype)

        part.forward = forward

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The part's weight in SAI row order (a fresh tensor; float8 upcast exactly, as `FusedLinearView` does)."""
        return swap_halves(dequantized(self.parts[0].weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(())

    @torch.no_grad()
    def add_to_parts(self, delta_weight: torch.Tensor) -> None:
        """Merge a ΔW given in the view's (SAI) row order into the diffusers weight."""
        part = self.parts[0]
        weight = part.weight
        merged = weight.float() + swap_halves(delta_weight).to(weight.device).float()
        if hasattr(part, "store_weight"):  # a quantized part (--base_quant) holds W' dequantized
            part.store_weight(merged)
            return
        weight.copy_(merged.to(weight.dtype))
