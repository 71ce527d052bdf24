"""The two `lycoris.kohya` algorithms whose package modules lorakit's network cannot hold as they are: `algo=full`
and `algo=dylora`. Their files are the package's (same tensor names and meaning), their training follows it; only
the module holding the tensors is lorakit's.

* `full` (LyCORIS' native fine-tuning): the package's `FullModule` moves the layer's weight into itself (and
  keeps a copy of the original on the CPU), which a network that must leave the base model's layers in place
  (samples with the adapter switched off, merging, several files on one model) cannot do. Here the adapter holds
  the weight difference itself, `diff` (and `diff_b` for a layer with a bias), zero at the start; the layer
  computes W x + b + m·(diff x + diff_b). That is what the package computes, and `diff`/`diff_b` are what its
  files hold and its loader (`FullModule.make_module_from_state_dict`) reads. Rank dropout drops output rows of
  the difference (rescaled with `rank_dropout_scale`), module dropout the whole branch, as there. A fused view
  (FLUX's q/k/v) has no bias of its own, so its file has no `diff_b`.
* `dylora`: the package's `DyLoraModule` does not load a state dict at all (its `load_state_dict` is a no-op),
  and its merge draws a random rank. Its files are plain LoRA files (`lora_down.weight`, `lora_up.weight`,
  `alpha` at the full rank), which every reader, the package's own loader included, merges as LoRA at
  alpha/rank. Here it is lorakit's DyLoRA module (`dylora.py`) with `unit` = the package's `block_size`: each
  step draws a number of leading blocks, trains the newest block with the earlier ones frozen, as the package
  does, and scales the sub-rank k by alpha/k; the package scales it by alpha/(blocks in play), so with
  `block_size` > 1 its files act `block_size` times weaker in every reader than they trained, which this does
  not copy. Neuron and rank dropout do not apply (the package's DyLoRA has neither); module dropout does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.base import AdapterModule, branch_input, check_probability, write_merged_weight
from lorakit.adapters.targets import AdapterTarget

__all__ = ["NATIVE_ALGOS", "FullDiffModule", "native_adapter"]

#: the `algo=` values built here instead of by the package's modules
NATIVE_ALGOS = ("full", "dylora")


class FullDiffModule(AdapterModule):
    """LyCORIS `algo=full`: a trained difference of the whole weight (and bias) of a Linear or Conv2d."""

    optional_tensors = ("diff_b",)

    def __init__(self, name: str, org_module: nn.Module, *, multiplier: float = 1.0, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, rank_dropout_scale: bool = False):
        super().__init__(name, org_module, multiplier)
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"algo=full adapts Linear and Conv2d layers, not {type(org_module).__name__}")
        weight = org_module.weight
        self.diff = nn.Parameter(torch.zeros(weight.shape, device=weight.device))
        bias = getattr(org_module, "bias", None)
        self.register_parameter("diff_b", None if bias is None else nn.Parameter(torch.zeros(bias.shape, device=bias.device)))
        self.rank_dropout = check_probability("rank_dropout", rank_dropout)
        self.module_dropout = check_probability("module_dropout", module_dropout)
        self.rank_dropout_scale = rank_dropout_scale

    def fill_missing(self, suffix: str) -> str:
        self.diff_b.data.zero_()
        return f"{self.lora_name} has no diff_b; the bias keeps its value"

    def delta_weight(self) -> torch.Tensor:
        return self.diff.detach().float()

    def _dropped_rows(self, diff: torch.Tensor, diff_b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The package's rank dropout of `full`: a keep-mask over the output rows (divided by its mean with
        rank_dropout_scale)."""
        keep = (torch.rand(diff.shape[0], device=diff.device) > self.rank_dropout).to(diff.dtype)
        if self.rank_dropout_scale:
            keep = keep / keep.mean()
        diff = diff * keep.view(-1, *[1] * (diff.dim() - 1))
        return diff, None if diff_b is None else diff_b * keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.original_forward(x)
        if self.multiplier == 0.0 or (self.training and self.module_dropout and torch.rand(()) < self.module_dropout):
            return out
        diff, diff_b = self.diff, self.diff_b
        if self.training and self.rank_dropout:
            diff, diff_b = self._dropped_rows(diff, diff_b)
        x = branch_input(x, diff.dtype)
        layer = self.org_module
        if isinstance(layer, nn.Conv2d):
            delta = F.conv2d(x, diff, diff_b, layer.stride, layer.padding, layer.dilation, layer.groups)
        else:
            delta = F.linear(x, diff, diff_b)
        return out + (delta * self.multiplier).to(out.dtype)

    @torch.no_grad()
    def merge_to_base(self, multiplier: float = 1.0) -> None:
        write_merged_weight(self.org_module, self.merged_weight(multiplier))
        if self.diff_b is not None:
            bias = self.org_module.bias
            bias.copy_((bias.float() + multiplier * self.diff_b.float()).to(bias.dtype))
        self.restore()

    def extra_repr(self) -> str:
        return f"name={self.lora_name}, algo=full, bias={self.diff_b is not None}"


def native_adapter(target: AdapterTarget, options) -> AdapterModule:
    """The module of `target` for a `NATIVE_ALGOS` algorithm, from the parsed `LycorisOptions`."""
    if options.algo == "full":
        return FullDiffModule(target.name, target.module, rank_dropout=options.rank_dropout,
                              module_dropout=options.module_dropout,
                              rank_dropout_scale=options.module_kwargs["rank_dropout_scale"])
    from lorakit.adapters.dylora import DyLoRAModule

    return DyLoRAModule(target.name, target.module, target.rank, target.alpha, unit=options.module_kwargs["block_size"],
                        module_dropout=options.module_dropout)
