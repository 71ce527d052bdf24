"""DoRA: weight-decomposed LoRA, stored as kohya LoRA tensors plus `dora_scale`.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv:2402.09353), Eq. (5): the adapted weight is
split into a magnitude and a direction,

    W' = m · (W + ΔW) / ‖W + ΔW‖,        ΔW = (alpha / r) · B A  (the LoRA product of `lora.py`),

with the magnitude m trainable and initialised to ‖W‖, so training starts from W' = W.

**Direction of the decomposition.** ‖·‖ is a vector norm taken along one axis of the weight, and the two
conventions in circulation differ in which:

* *output axis* (this module's default, `wd_on_output=True`): one magnitude per output channel, the norm of
  each output row over all input dimensions (and kernel taps). m has shape (out, 1) for a linear and
  (out, 1, 1, 1) for a conv. This is what the DoRA reference code and PEFT compute (PEFT's
  `lora_magnitude_vector`, shape (out,)), what LyCORIS writes by default, and the only layout diffusers
  loads (it renames kohya `dora_scale` to `lora_magnitude_vector`).
* *input axis* (`wd_on_output=False`): one magnitude per input channel, the norm of each input column over
  the output channels; m has shape (1, in) or (1, in, 1, 1). Early LyCORIS and kohya DoRA builds wrote this.

ComfyUI and Forge tell the two apart by the shape of `dora_scale` (first dimension equal to the number of
output channels means the output axis), so both kinds of file load there; this module reads both as well.

Training follows §4.3 of the paper: ‖W + ΔW‖ is computed from the current weights but detached from the
gradient graph, which saves the memory of back-propagating through the norm. `--network_dropout` (neuron
dropout) is not applied with DoRA, since it would make the direction and its norm disagree; rank and module
dropout still apply. At multiplier s the merged weight is W + s·(W'_DoRA − W), the interpolation ComfyUI uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.lora import LoRAModule

__all__ = ["DoRAModule", "dora_magnitude_axis", "dora_merged_weight", "dora_weight_norm"]


def dora_magnitude_axis(magnitude: torch.Tensor, weight_shape: torch.Size | tuple[int, ...]) -> int:
    """0 when `magnitude` holds one value per output channel, 1 when per input channel (ComfyUI's rule)."""
    out_channels, in_channels = weight_shape[0], weight_shape[1]
    if magnitude.shape[0] == out_channels and magnitude.numel() == out_channels:
        return 0
    if magnitude.numel() == in_channels:
        return 1
    raise ValueError(
        f"dora_scale of shape {tuple(magnitude.shape)} fits neither the output ({out_channels}) nor the "
        f"input ({in_channels}) channels of a weight of shape {tuple(weight_shape)}"
    )


def dora_weight_norm(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """‖W‖ per output channel (axis 0) or per input channel (axis 1), shaped to broadcast against W."""
    keep = [1] * weight.dim()
    keep[axis] = weight.shape[axis]
    moved = weight.transpose(0, axis).reshape(weight.shape[axis], -1)
    return moved.norm(dim=1).reshape(keep)


def dora_merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """W + s·(m·(W + ΔW)/‖W + ΔW‖ − W) in float32 or wider; the axis is read from the shape of `magnitude`."""
    compute = torch.promote_types(torch.promote_types(weight.dtype, delta.dtype), torch.float32)
    weight = weight.to(compute)
    combined = weight + delta.to(device=weight.device, dtype=compute)
    axis = dora_magnitude_axis(magnitude, weight.shape)
    norm = dora_weight_norm(combined, axis) + torch.finfo(compute).eps
    shape = [1] * weight.dim()
    shape[axis] = weight.shape[axis]
    decomposed = combined * (magnitude.to(device=weight.device, dtype=compute).reshape(shape) / norm)
    return weight + multiplier * (decomposed - weight)


class DoRAModule(LoRAModule):
    """LoRA with a learned magnitude (`dora_scale`); files are kohya LoRA files plus `<name>.dora_scale`."""

    def __init__(self, *args, wd_on_output: bool = True, **kwargs):
        kwargs["dropout"] = None  # neuron dropout does not apply to DoRA (see the module docstring)
        super().__init__(*args, **kwargs)
        weight = self.org_module.weight.detach().float()
        axis = 0 if wd_on_output else 1
        self.dora_scale = nn.Parameter(dora_weight_norm(weight, axis).to(self.lora_down.weight.device))

    @property
    def magnitude_axis(self) -> int:
        return dora_magnitude_axis(self.dora_scale, self.org_module.weight.shape)

    def merged_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        return dora_merged_weight(self.org_module.weight, self.delta_weight(), self.dora_scale, multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.original_forward(x)
        if self.multiplier == 0.0:
            return out
        if self.training and self.module_dropout > 0.0 and torch.rand(()) < self.module_dropout:
            return out
        gain = self._gain()  # m / ‖W + ΔW‖, detached norm
        bias = self.org_module.bias
        base = out if bias is None else out - self._channel_view(bias.to(out.dtype), out)
        if self.magnitude_axis == 0:
            decomposed = self._channel_view(gain, out) * (base.float() + self._branch(x))
        else:
            # a per-input-channel gain scales the input of the whole (W + ΔW) layer
            scaled = x.float() * self._channel_view(gain, x)
            decomposed = self._base_op(scaled) + self._branch(scaled)
        return out + (self.multiplier * (decomposed - base.float())).to(out.dtype)

    def _gain(self) -> torch.Tensor:
        with torch.no_grad():
            weight = self.org_module.weight.float()
            combined = weight + self.delta_weight().to(device=weight.device, dtype=torch.float32)
            norm = dora_weight_norm(combined, self.magnitude_axis).flatten() + torch.finfo(torch.float32).eps
        return self.dora_scale.flatten().float() / norm

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x with rank dropout (in training), without the multiplier."""
        hidden = self.lora_down(x.to(self.lora_down.weight.dtype))
        scale = self.scale
        if self.training and self.rank_dropout > 0.0:
            hidden = hidden * self._rank_dropout_mask(hidden)
            scale = scale / (1.0 - self.rank_dropout)
        return (self.lora_up(hidden) * scale).float()

    def _base_op(self, x: torch.Tensor) -> torch.Tensor:
        """W x without bias, in float32."""
        layer, weight = self.org_module, self.org_module.weight.float()
        if self.is_conv:
            return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return F.linear(x, weight)

    def _channel_view(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-channel values shaped to broadcast over an activation (channels on dim 1 for convs, last for linears)."""
        if self.is_conv:
            return values.view(1, -1, *([1] * (like.dim() - 2)))
        return values.view(*([1] * (like.dim() - 1)), -1)

    @torch.no_grad()
    def load_adapter_tensors(self, tensors, source):
        # A file may hold the other decomposition axis; adopt its layout before the strict copy.
        value = tensors.get("dora_scale")
        if value is not None and value.shape != self.dora_scale.shape:
            try:
                dora_magnitude_axis(value, self.org_module.weight.shape)
            except ValueError:
                pass  # the strict copy reports the shape mismatch
            else:
                self.dora_scale = nn.Parameter(
                    value.detach().to(device=self.dora_scale.device, dtype=self.dora_scale.dtype).clone()
                )
        return super().load_adapter_tensors(tensors, source)

    def extra_repr(self) -> str:
        axis = "output" if self.magnitude_axis == 0 else "input"
        return super().extra_repr() + f", dora={axis}-axis"
