"""LoRA: a trainable low-rank update added beside a frozen Linear or Conv2d.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685): the weight of a frozen
layer is adapted as W' = W + (alpha / r) * B A with A (r x in) and B (out x r), A random, B zero, so training
starts from the unchanged model. For convolutions the kohya variants are used:

* LoRA-LierLa (linears and 1x1 convs): A and B are a linear (or 1x1 conv) pair;
* LoRA-C3Lier (3x3 convs): A is a conv with the original kernel, stride, padding and dilation, B a 1x1 conv,
  so B∘A is itself one conv with kernel ΔW[o, i] = Σ_r B[o, r] A[r, i] (the composition below).

Training-time regularisers follow sd-scripts: neuron dropout on A x, rank dropout (a Bernoulli mask over the
rank channels per sample, rescaled by 1/(1-p) so the expectation is unchanged, as in inverted dropout,
Srivastava et al. 2014) and module dropout (the whole branch skipped with probability p).

The pure tensor functions at the top are the single implementation of the math; the module and the offline
tools (merge, extract, resize) all call them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.base import AdapterModule, branch_input, check_probability

__all__ = ["LoRAModule", "lora_delta_weight", "lora_scale"]


def lora_scale(alpha: float | torch.Tensor | None, rank: int) -> float:
    """The factor alpha / rank applied to the low-rank product; alpha None or 0 means alpha = rank."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    value = float(alpha) if alpha is not None else 0.0
    return (value if value != 0.0 else float(rank)) / rank


def lora_delta_weight(
    down: torch.Tensor,
    up: torch.Tensor,
    alpha: float | torch.Tensor | None,
    *,
    conv_kernel: Sequence[int] | None = None,
) -> torch.Tensor:
    """ΔW = (alpha / rank) · up ∘ down, in the shape of the adapted layer's weight.

    `down` is (r, in) for a linear or (r, in, kh, kw) for a conv; `up` is (out, r) or (out, r, 1, 1). The
    rank is `down.shape[0]`. For a 3x3 (any kh x kw) down conv followed by a 1x1 up conv the composed kernel
    is ΔW[o, i, y, x] = Σ_r up[o, r] · down[r, i, y, x], computed as a convolution of the permuted down
    kernel with the up kernel. `conv_kernel` asks for a conv-shaped result (out, in, kh, kw) when the factors
    are stored as 2-D matrices (only possible for 1x1 convs).

    The product is computed in at least float32 so that merging into a half-precision base loses nothing
    before the final cast, and returned in that dtype.
    """
    if down.shape[0] != up.shape[1]:
        raise ValueError(f"LoRA rank mismatch: down {tuple(down.shape)} vs up {tuple(up.shape)}")
    scale = lora_scale(alpha, down.shape[0])
    compute_dtype = torch.promote_types(torch.promote_types(down.dtype, up.dtype), torch.float32)
    down = down.to(compute_dtype)
    up = up.to(compute_dtype)
    if down.dim() == 2:
        delta = up.flatten(1) @ down
        if conv_kernel is not None:
            if tuple(conv_kernel) != (1, 1):
                raise ValueError(f"2-D LoRA factors can only form a 1x1 conv, not {tuple(conv_kernel)}")
            delta = delta[:, :, None, None]
        return delta * scale
    if down.dim() != 4:
        raise ValueError(f"LoRA down weight must be 2-D or 4-D, got shape {tuple(down.shape)}")
    if conv_kernel is not None and tuple(conv_kernel) != tuple(down.shape[2:]):
        raise ValueError(f"LoRA down kernel {tuple(down.shape[2:])} does not match {tuple(conv_kernel)}")
    if up.dim() == 4 and up.shape[2:] != (1, 1):
        raise ValueError(f"LoRA up weight must be a 1x1 conv, got shape {tuple(up.shape)}")
    up_matrix = up.flatten(1)
    if down.shape[2:] == (1, 1):
        return (up_matrix @ down.flatten(1))[:, :, None, None] * scale
    # (in, r, kh, kw) convolved with (out, r, 1, 1) gives (in, out, kh, kw): Σ_r over the rank channels.
    composed = F.conv2d(down.permute(1, 0, 2, 3), up_matrix[:, :, None, None]).permute(1, 0, 2, 3)
    return composed * scale


def _make_factors(org_module: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
    """The down/up layers matching the wrapped layer's type and geometry."""
    if isinstance(org_module, nn.Linear):
        return (
            nn.Linear(org_module.in_features, rank, bias=False),
            nn.Linear(rank, org_module.out_features, bias=False),
        )
    if isinstance(org_module, nn.Conv2d):
        if org_module.groups != 1:
            raise ValueError(f"LoRA does not support grouped convolutions (groups={org_module.groups})")
        down = nn.Conv2d(
            org_module.in_channels,
            rank,
            kernel_size=org_module.kernel_size,
            stride=org_module.stride,
            padding=org_module.padding,
            dilation=org_module.dilation,
            padding_mode=org_module.padding_mode,
            bias=False,
        )
        up = nn.Conv2d(rank, org_module.out_channels, kernel_size=1, bias=False)
        return down, up
    raise TypeError(f"LoRA can wrap nn.Linear or nn.Conv2d, not {type(org_module).__name__}")


class LoRAModule(AdapterModule):
    """A LoRA branch attached beside one frozen `nn.Linear` or `nn.Conv2d`.

    The original layer is not replaced: `apply_to()` swaps its `forward` for this module's, which calls the
    original forward and adds the branch. The base model's state-dict names therefore never change, and
    `restore()` gives the original forward back. The wrapped layer is held outside this module's submodules
    so that the LoRA state dict holds only `lora_down.weight`, `lora_up.weight` and `alpha`.
    """

    optional_tensors = ("alpha",)

    def __init__(
        self,
        name: str,
        org_module: nn.Module,
        rank: int,
        alpha: float | None = None,
        *,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__(name, org_module, multiplier)
        if rank <= 0:
            raise ValueError(f"{name}: LoRA rank must be positive, got {rank}")
        self.rank = int(rank)
        self.dropout = check_probability("dropout", dropout)
        self.rank_dropout = check_probability("rank_dropout", rank_dropout)
        self.module_dropout = check_probability("module_dropout", module_dropout)
        self.is_conv = isinstance(org_module, nn.Conv2d)
        self.lora_down, self.lora_up = _make_factors(org_module, self.rank)
        weight = org_module.weight
        self.lora_down.to(device=weight.device)
        self.lora_up.to(device=weight.device)
        self.init_factors()
        alpha_value = float(alpha) if alpha else float(self.rank)
        self.register_buffer("alpha", torch.tensor(alpha_value, device=weight.device))
        self.scale = alpha_value / self.rank
        self.register_load_state_dict_post_hook(lambda module, _incompatible: module.refresh_scale())

    def init_factors(self) -> None:
        """Random down, zero up: ΔW = 0 at the start (Hu et al. §4.1)."""
        # a = √5 is PyTorch's default for Linear/Conv weights.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def refresh_scale(self) -> None:
        """Recompute the cached scale after `alpha` changed (e.g. loaded from a file)."""
        self.scale = lora_scale(self.alpha, self.rank)

    def after_load(self) -> None:
        self.refresh_scale()

    def fill_missing(self, suffix: str) -> str:
        self.alpha.fill_(self.rank)
        return f"{self.lora_name} has no alpha; using alpha = rank ({self.rank})"

    def plus_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.lora_up.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.original_forward(x)
        if self._skips_branch():
            return out
        hidden = self.lora_down(branch_input(x, self.lora_down.weight.dtype))
        if self.training and self.dropout > 0.0:
            hidden = F.dropout(hidden, p=self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout > 0.0:
            hidden = hidden * self._rank_dropout_mask(hidden)
            scale = scale / (1.0 - self.rank_dropout)
        delta = self.lora_up(hidden) * (self.multiplier * scale)
        return out + delta.to(out.dtype)

    def _skips_branch(self) -> bool:
        """True when this step adds nothing: multiplier 0, or (training) module dropout drops the whole branch."""
        if self.multiplier == 0.0:
            return True
        return self.training and self.module_dropout > 0.0 and bool(torch.rand(()) < self.module_dropout)

    def _rank_dropout_mask(self, hidden: torch.Tensor) -> torch.Tensor:
        """A (batch, rank) keep-mask shaped to broadcast over `hidden` (rank on dim 1 for convs, last otherwise)."""
        rank = hidden.shape[1] if self.is_conv else hidden.shape[-1]
        keep = (torch.rand(hidden.shape[0], rank, device=hidden.device) >= self.rank_dropout).to(hidden.dtype)
        if self.is_conv:
            return keep[:, :, None, None]
        return keep.view(hidden.shape[0], *([1] * (hidden.dim() - 2)), rank)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (without the multiplier) in the wrapped weight's shape, in float32 or wider."""
        kernel = self.org_module.weight.shape[2:] if self.is_conv else None
        return lora_delta_weight(self.lora_down.weight, self.lora_up.weight, self.alpha, conv_kernel=kernel)

    def extra_repr(self) -> str:
        return f"name={self.lora_name}, rank={self.rank}, alpha={float(self.alpha):g}, conv={self.is_conv}"
