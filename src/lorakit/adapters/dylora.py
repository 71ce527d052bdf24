"""DyLoRA: one LoRA trained so that every leading sub-rank works (sd-scripts `networks.dylora`).

Valipour et al., "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank
Adaptation" (arXiv:2210.07558), Eq. (5)-(6): at each training step a rank b is drawn uniformly from
{unit, 2·unit, …, r}; the forward uses only the first b rank components,

    ΔW_b = (alpha / b) · B[:, :b] A[:b, :],

and only the newest block of `unit` components (b − unit … b − 1) receives gradients ("frozen" mode), so the
earlier components, already trained for the smaller ranks, keep their meaning. After training, the first b
rows/columns of the saved factors form a valid rank-b LoRA for any multiple b of `unit` (sd-scripts'
`extract_lora_from_dylora.py` keeps alpha, which is exactly the alpha/b scale used here). In evaluation the
full rank r is used with the ordinary LoRA scale alpha/r, so the saved file is a plain kohya LoRA file.

sd-scripts' own module draws b the same way but always multiplies all r components, compensating with a
√(r/b) factor; it therefore never trains the truncated sub-networks that DyLoRA is meant to produce. The
paper's truncated forward is used here so that every extracted rank reproduces what was trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.adapters.base import branch_input
from lorakit.adapters.lora import LoRAModule

__all__ = ["DyLoRAModule"]


class DyLoRAModule(LoRAModule):
    """LoRA with nested ranks: rank must be a multiple of `unit`."""

    def __init__(self, *args, unit: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if unit <= 0 or self.rank % unit:
            raise ValueError(f"{self.lora_name}: DyLoRA rank {self.rank} must be a positive multiple of unit {unit}")
        self.unit = int(unit)

    def sample_rank(self) -> int:
        """b: a random multiple of `unit` in [unit, rank]."""
        steps = self.rank // self.unit
        return (int(torch.randint(steps, ())) + 1) * self.unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        out = self.original_forward(x)
        if self._skips_branch():
            return out
        b = self.sample_rank()
        down, up = self._truncated_factors(b)
        hidden = self._down(branch_input(x, down.dtype), down)
        if self.dropout > 0.0:
            hidden = F.dropout(hidden, p=self.dropout)
        scale = self.scale * self.rank / b  # alpha / b, without reading the alpha buffer (a GPU sync) every step
        if self.rank_dropout > 0.0:
            hidden = hidden * self._rank_dropout_mask(hidden)
            scale = scale / (1.0 - self.rank_dropout)
        delta = self._up(hidden, up) * (self.multiplier * scale)
        return out + delta.to(out.dtype)

    def _truncated_factors(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first b components; those before the newest `unit` are detached (frozen for this step)."""
        down, up = self.lora_down.weight, self.lora_up.weight
        start = b - self.unit
        down_b = torch.cat([down[:start].detach(), down[start:b]], dim=0)
        up_b = torch.cat([up[:, :start].detach(), up[:, start:b]], dim=1)
        return down_b, up_b

    def _down(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        if not self.is_conv:
            return F.linear(x, down)
        layer = self.lora_down
        return F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation)

    def _up(self, hidden: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.conv2d(hidden, up) if self.is_conv else F.linear(hidden, up)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", unit={self.unit}"
