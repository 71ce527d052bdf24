"""DoRA: weight-decomposed LoRA, stored as kohya LoRA tensors plus `dora_scale`.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv:2402.09353), Eq. (5): the adapted weight is
split into a magnitude and a direction,

    W' = m · (W + ΔW) / ‖W + ΔW‖,        ΔW = (alpha / r) · up · down  (the LoRA product of `lora.py`),

with the magnitude m trainable and initialised to ‖W‖, so training starts from W' = W. The norm is taken over
the merged W + ΔW with the LoRA scale alpha/r included (and without the multiplier). At multiplier s the merged
weight is W + s·(W' − W), the interpolation A1111 and ComfyUI use.

**Axis of the decomposition.** ‖·‖ is a vector norm along one axis of the weight (out, in[, kh, kw]):

* *input axis* (the default, `wd_on_output=False`): one magnitude per input channel, the norm of each input
  column over the output channels (and kernel taps); `dora_scale` has shape (1, in) or (1, in, 1, 1). This is
  the paper's Eq. (5) as written (m ∈ R^{1×k}, column norms of W ∈ R^{d×k}) and the layout every reader of
  kohya `.dora_scale` files computes the same way: A1111's built-in Lora extension and older ComfyUI only know
  this axis; ComfyUI ≥ 0.3 and Forge pick it from the shape and divide by the column norms of W + ΔW.
  LyCORIS computes the same weight with `wd_on_out=False`.
* *output axis* (`wd_on_output=True`): one magnitude per output channel, shape (out, 1) or (out, 1, 1, 1), the
  DoRA reference code's and PEFT's `lora_magnitude_vector` axis and LyCORIS' `wd_on_out=True`. Only LyCORIS
  and lorakit merge such a kohya file as written: ComfyUI/Forge divide an output-axis `dora_scale` by the row
  norms of the *base* weight W instead of W + ΔW, and A1111/older ComfyUI broadcast it against input-column
  norms. Saving an output-axis module therefore logs a warning.

diffusers (0.42, `StableDiffusion[XL]LoraLoaderMixin.lora_state_dict`) drops every `dora_scale` key of a kohya
file, whichever the axis, and applies the plain LoRA W + ΔW (huggingface/diffusers#9547); no kohya DoRA layout
changes that. Its kohya→PEFT rename (`dora_scale` → `lora_magnitude_vector`) is not reached from that path, and
PEFT's magnitude is per output channel, so only a PEFT-layout output-axis file would give diffusers DoRA.

Files from other tools are read by shape (see `dora_magnitude_axis`), 1-D magnitudes included; the module adopts
the file's axis.

Training follows §4.3 of the paper: ‖W + ΔW‖ is computed from the current weights but detached from the
gradient graph, which saves the memory of back-propagating through the norm. `--network_dropout` (neuron
dropout) is not applied with DoRA, since it would make the direction and its norm disagree; rank and module
dropout still apply.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.base import base_weight, branch_input, dequantized, is_fused_view
from lorakit.adapters.lora import LoRAModule

__all__ = [
    "DoRAModule",
    "dora_magnitude_axis",
    "dora_magnitude_shape",
    "dora_merged_weight",
    "dora_weight_norm",
]

log = logging.getLogger(__name__)
_warned_output_axis = False


def dora_magnitude_axis(magnitude: torch.Tensor, weight_shape: torch.Size | tuple[int, ...]) -> int:
    """0 when `magnitude` holds one value per output channel, 1 when per input channel.

    A tensor of two or more dimensions says its axis by where its non-singleton size sits: (out, 1[, 1, 1]) is
    the output axis, (1, in[, 1, 1]) the input axis, whatever the two sizes are (square layers included). A 1-D
    tensor (PEFT's `lora_magnitude_vector` renamed, some converters) is the output axis when its length is the
    number of output channels, as in ComfyUI's shape rule, else the input axis when it is the number of inputs.
    """
    out_channels, in_channels = int(weight_shape[0]), int(weight_shape[1])
    shape = tuple(magnitude.shape)
    if len(shape) >= 2:
        rest = shape[2:]
        if all(d == 1 for d in rest):
            if shape[1] == 1 and shape[0] == out_channels:
                return 0
            if shape[0] == 1 and shape[1] == in_channels:
                return 1
    elif len(shape) == 1:
        if shape[0] == out_channels:
            return 0
        if shape[0] == in_channels:
            return 1
    raise ValueError(
        f"dora_scale of shape {shape} fits neither the output ({out_channels}, 1, ...) nor the input "
        f"(1, {in_channels}, ...) channels of a weight of shape {tuple(weight_shape)}"
    )


def dora_magnitude_shape(axis: int, weight_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The on-disk shape of a magnitude on `axis`: (out, 1[, 1, 1]) or (1, in[, 1, 1])."""
    shape = [1] * len(weight_shape)
    shape[axis] = int(weight_shape[axis])
    return tuple(shape)


def dora_weight_norm(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """‖W‖ per output channel (axis 0) or per input channel (axis 1), shaped to broadcast against W."""
    moved = weight.transpose(0, axis).reshape(weight.shape[axis], -1)
    return moved.norm(dim=1).reshape(dora_magnitude_shape(axis, weight.shape))


def dora_merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """W + s·(m·(W + ΔW)/‖W + ΔW‖ − W) in float32 or wider; the axis is read from the shape of `magnitude`."""
    weight = dequantized(weight)  # float8 takes part in no type promotion
    compute = torch.promote_types(torch.promote_types(weight.dtype, delta.dtype), torch.float32)
    weight = weight.to(compute)
    combined = weight + delta.to(device=weight.device, dtype=compute)
    axis = dora_magnitude_axis(magnitude, weight.shape)
    norm = dora_weight_norm(combined, axis) + torch.finfo(compute).eps
    m = magnitude.to(device=weight.device, dtype=compute).reshape(dora_magnitude_shape(axis, weight.shape))
    decomposed = combined * (m / norm)
    return weight + multiplier * (decomposed - weight)


class DoRAModule(LoRAModule):
    """LoRA with a learned magnitude (`dora_scale`); files are kohya LoRA files plus `<name>.dora_scale`."""

    def __init__(self, *args, wd_on_output: bool = False, **kwargs):
        kwargs["dropout"] = None  # neuron dropout does not apply to DoRA (see the module docstring)
        super().__init__(*args, **kwargs)
        weight = self.org_module.weight.detach().float()
        axis = 0 if wd_on_output else 1
        self.dora_scale = nn.Parameter(dora_weight_norm(weight, axis).to(self.lora_down.weight.device))

    @property
    def magnitude_axis(self) -> int:
        return dora_magnitude_axis(self.dora_scale, self.org_module.weight.shape)

    def merged_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        return dora_merged_weight(base_weight(self.org_module), self.delta_weight(), self.dora_scale, multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.original_forward(x)
        if self._skips_branch():
            return out
        # read once: a fused view's weight (FLUX/SD3 q/k/v) is a fresh concatenation of its parts on every read
        weight = base_weight(self.org_module).float()
        axis = dora_magnitude_axis(self.dora_scale, weight.shape)
        gain = self._gain(weight, axis)  # m / ‖W + ΔW‖, detached norm
        bias = self.org_module.bias
        if is_fused_view(self.org_module):  # its own output is zero; its parts add W x + b themselves
            base = self._base_op(x.float(), weight)
        else:
            base = out if bias is None else out - self._channel_view(bias.to(out.dtype), out)
        if axis == 0:
            decomposed = self._channel_view(gain, out) * (base.float() + self._branch(x))
        else:
            # a per-input-channel gain scales the input of the whole (W + ΔW) layer
            scaled = x.float() * self._channel_view(gain, x)
            decomposed = self._base_op(scaled, weight) + self._branch(scaled)
        return out + (self.multiplier * (decomposed - base.float())).to(out.dtype)

    def _gain(self, weight: torch.Tensor, axis: int) -> torch.Tensor:
        """m / ‖W + ΔW‖ for the float32 base `weight`, the norm taken along `axis` without gradients."""
        with torch.no_grad():
            combined = weight + self.delta_weight().to(device=weight.device, dtype=torch.float32)
            norm = dora_weight_norm(combined, axis).flatten() + torch.finfo(torch.float32).eps
        return self.dora_scale.flatten().float() / norm

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x with rank dropout (in training), without the multiplier."""
        hidden = self.lora_down(branch_input(x, self.lora_down.weight.dtype))
        scale = self.scale
        if self.training and self.rank_dropout > 0.0:
            hidden = hidden * self._rank_dropout_mask(hidden)
            scale = scale / (1.0 - self.rank_dropout)
        return (self.lora_up(hidden) * scale).float()

    def _base_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """W x without bias, in float32 (`weight`: the layer's weight as float32)."""
        layer = self.org_module
        if self.is_conv:
            return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return F.linear(x, weight)

    def _channel_view(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-channel values shaped to broadcast over an activation (channels on dim 1 for convs, last for linears)."""
        if self.is_conv:
            return values.view(1, -1, *([1] * (like.dim() - 2)))
        return values.view(*([1] * (like.dim() - 1)), -1)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        tensors = super().adapter_state_dict()
        shape = dora_magnitude_shape(self.magnitude_axis, self.org_module.weight.shape)
        tensors["dora_scale"] = tensors["dora_scale"].reshape(shape)
        if self.magnitude_axis == 0:
            global _warned_output_axis
            if not _warned_output_axis:
                _warned_output_axis = True
                log.warning(
                    "DoRA with wd_on_output=True writes dora_scale per output channel: LyCORIS and lorakit merge "
                    "it as trained, but ComfyUI/Forge divide it by the norm of the base weight instead of "
                    "W + ΔW and A1111 reads dora_scale per input channel; train with wd_on_output=False for "
                    "files those programs reproduce exactly"
                )
        return tensors

    @torch.no_grad()
    def load_adapter_tensors(self, tensors, source):
        # A file may hold either decomposition axis, as (out, 1, ...), (1, in, ...) or 1-D: adopt its axis and
        # bring it to this module's on-disk shape before the strict copy.
        value = tensors.get("dora_scale")
        if isinstance(value, torch.Tensor):
            weight_shape = self.org_module.weight.shape
            try:
                axis = dora_magnitude_axis(value, weight_shape)
            except ValueError:
                axis = None  # the strict copy reports the shape mismatch
            if axis is not None:
                value = value.reshape(dora_magnitude_shape(axis, weight_shape))
                if value.shape != self.dora_scale.shape:
                    self.dora_scale = nn.Parameter(
                        torch.empty(value.shape, device=self.dora_scale.device, dtype=self.dora_scale.dtype),
                        requires_grad=self.dora_scale.requires_grad,
                    )
                tensors = {**tensors, "dora_scale": value}
        return super().load_adapter_tensors(tensors, source)

    def extra_repr(self) -> str:
        axis = "output" if self.magnitude_axis == 0 else "input"
        return super().extra_repr() + f", dora={axis}-axis"
