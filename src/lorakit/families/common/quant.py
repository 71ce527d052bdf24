"""Quantized frozen weights (`--base_quant`): the base model's linears and convolutions stored in fewer bits.

Modes (`MODES`):

* `fp8` is `--fp8_base` (float8_e4m3fn, no scale; `layers.to_fp8`, applied by the families as they load);
* `fp8_scaled`: float8_e4m3fn with one float32 scale per output channel (the row's largest |w| maps to 448,
  e4m3's largest value), so small rows keep e4m3's full relative precision instead of falling into its
  subnormals: less error than plain fp8 at the same size;
* `int8`: int8 with one float32 scale per output channel (absmax / 127), weight-only: the activations stay in
  the compute dtype;
* `nf4`: 4-bit NormalFloat in blocks of 64 with a float32 absmax per block (QLoRA's format), encoded and decoded by
  bitsandbytes (its CPU backend included), so the codes are exactly those bitsandbytes' own layers hold.

A quantized layer (`QuantizedLinear`, `QuantizedConv2d`) keeps its stored codes as the `weight` Parameter in
`_parameters` (so block swap streams them, and `.to(dtype)` leaves them alone) and its scales as plain tensors
that follow the module's device. Reading `layer.weight` gives the dequantized weight W in the layer's compute
dtype: every adapter, fused view and merge reads W through it unchanged. Writing a merged W' goes through
`store_weight`, which turns the layer back into a plain layer holding W' (requantizing would round most of a
small ΔW away: an NF4 step is about a seventh of its block's largest weight). `state_dict()` holds W (dequantized, in float32, exact):
whole-model writers see a plain model, and loading such a state into a quantized layer quantizes it again
(exactly: the largest code maps back onto itself).

Forward and backward dequantize per call and autograd keeps the stored Parameter, not its upcast, as
`layers.Fp8Linear` does (under torch.compile the plain path is traced instead, which the compiler can fuse).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.families.common.layers import Fp8Linear, to_fp8

log = logging.getLogger("lorakit")

MODES = ("fp8", "fp8_scaled", "int8", "nf4")
#: bytes stored per weight, scales included (the planner's figures; NF4: 4 bits + one float32 per 64 weights)
BYTES_PER_WEIGHT = {"fp8": 1.0, "fp8_scaled": 1.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}
FP8_MAX = 448.0  # the largest float8_e4m3fn value
NF4_BLOCK = 64


# ------------------------------------------------------------------------------------------------ codecs


class Codec:
    """How one weight tensor is stored: `encode` gives the stored codes and the scales, `decode` W again."""

    name = ""

    def encode(self, weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, scales: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError


def _row_absmax(weight: torch.Tensor) -> torch.Tensor:
    """The largest |w| of each output channel, shaped to broadcast over the weight (never zero)."""
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    return flat.abs().amax(dim=1).clamp(min=1e-12).reshape(-1, *([1] * (weight.ndim - 1)))


class ScaledFp8(Codec):
    name = "fp8_scaled"

    def encode(self, weight):
        scale = _row_absmax(weight) / FP8_MAX
        return (weight.float() / scale).to(torch.float8_e4m3fn), {"scale": scale}

    def decode(self, codes, scales, shape, dtype):
        return (codes.to(torch.float32) * scales["scale"].to(codes.device)).to(dtype)


class Int8(Codec):
    name = "int8"

    def encode(self, weight):
        scale = _row_absmax(weight) / 127.0
        return torch.round(weight.float() / scale).clamp_(-127, 127).to(torch.int8), {"scale": scale}

    def decode(self, codes, scales, shape, dtype):
        return (codes.to(torch.float32) * scales["scale"].to(codes.device)).to(dtype)


class Nf4(Codec):
    """bitsandbytes' NF4 (blocks of 64, float32 absmax per block, no double quantization)."""

    name = "nf4"

    def encode(self, weight):
        functional = _bitsandbytes()
        packed, state = functional.quantize_4bit(weight.detach().float().contiguous(), blocksize=NF4_BLOCK, quant_type="nf4")
        return packed, {"absmax": state.absmax, "code": state.code}

    def decode(self, codes, scales, shape, dtype):
        functional = _bitsandbytes()
        state = functional.QuantState(absmax=scales["absmax"].to(codes.device), shape=shape, code=scales["code"].to(codes.device),
                                      blocksize=NF4_BLOCK, quant_type="nf4", dtype=torch.float32)
        return functional.dequantize_4bit(codes, state).to(dtype)


def _bitsandbytes() -> Any:
    try:
        quiet = logging.getLogger("bitsandbytes")
        level, quiet.level = quiet.level, logging.ERROR  # it logs an optional CPU kernel it looks for at import
        import bitsandbytes.functional as functional
    except ImportError:
        raise ImportError("--base_quant nf4 needs bitsandbytes: pip install 'lorakit[optimizers]' (or bitsandbytes)") from None
    finally:
        quiet.level = level
    return functional


CODECS: dict[str, Codec] = {codec.name: codec for codec in (ScaledFp8(), Int8(), Nf4())}


# ------------------------------------------------------------------------------------------------ layers


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class _Quantized:
    """What `QuantizedLinear` and `QuantizedConv2d` share (see the module doc); mixed in before the layer class."""

    codec: Codec
    quant_scales: dict[str, torch.Tensor]
    weight_shape: torch.Size
    dequant_dtype: torch.dtype

    def _quantize(self, codec: Codec) -> None:
        weight = self._parameters["weight"]
        codes, scales = codec.encode(weight.data)
        self.codec, self.quant_scales = codec, scales
        self.weight_shape, self.dequant_dtype = weight.shape, weight.dtype
        self._parameters["weight"] = nn.Parameter(codes, requires_grad=False)
        self._register_state_dict_hook(_dequantized_state)
        self._register_load_state_dict_pre_hook(_quantize_loaded_state, with_module=True)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """W, dequantized in the layer's compute dtype (a fresh tensor: read it; merges go to `store_weight`)."""
        return self.decode(self.dequant_dtype)

    def decode(self, dtype: torch.dtype) -> torch.Tensor:
        return self.codec.decode(self._parameters["weight"], self.quant_scales, self.weight_shape, dtype)

    @torch.no_grad()
    def store_weight(self, merged: torch.Tensor) -> None:
        """Hold W' (a merge) as a plain layer in the compute dtype: the layer is no longer quantized."""
        codes = self._parameters["weight"]
        self._parameters["weight"] = nn.Parameter(merged.to(device=codes.device, dtype=self.dequant_dtype), requires_grad=False)
        self.__class__ = PLAIN_OF[type(self)]
        for name in ("codec", "quant_scales", "weight_shape", "dequant_dtype"):
            self.__dict__.pop(name, None)

    def _apply(self, fn, recurse: bool = True):
        # the codes keep their dtype and the scales stay float32; a cast of the model only changes the
        # dtype W is dequantized into (it is what the rest of the model computes in)
        probe = fn(torch.empty(0, dtype=torch.float32, device=self._parameters["weight"].device))
        codes = self._parameters["weight"]
        self._parameters.pop("weight")
        super()._apply(fn, recurse)  # type: ignore[misc]
        self._parameters["weight"] = codes
        codes.data = codes.data.to(probe.device)
        self.quant_scales = {k: v.to(probe.device) for k, v in self.quant_scales.items()}
        if probe.dtype.is_floating_point and probe.dtype != torch.float32:
            self.dequant_dtype = probe.dtype
        elif probe.dtype == torch.float32 and fn(torch.empty(0, dtype=torch.float16)).dtype == torch.float32:
            self.dequant_dtype = torch.float32
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base_quant={self.codec.name}"  # type: ignore[misc]


class QuantizedLinear(_Quantized, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        if torch.compiler.is_compiling():
            return F.linear(x.to(dtype), self.decode(dtype), bias)
        return _DequantizedLinear.apply(x.to(dtype), self._parameters["weight"], bias, self)


class QuantizedConv2d(_Quantized, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        if torch.compiler.is_compiling() or self.padding_mode != "zeros":
            return self._conv_forward(x.to(dtype), self.decode(dtype), bias)
        return _DequantizedConv2d.apply(x.to(dtype), self._parameters["weight"], bias, self)


PLAIN_OF = {QuantizedLinear: nn.Linear, QuantizedConv2d: nn.Conv2d}
QUANTIZED_OF = {nn.Linear: QuantizedLinear, nn.Conv2d: QuantizedConv2d}


class _DequantizedLinear(torch.autograd.Function):
    """F.linear with W decoded from the stored codes; backward decodes again instead of keeping the upcast
    (the codes Parameter is saved, so under block swap backward reads the block's storage of that moment)."""

    @staticmethod
    def forward(ctx, x, codes, bias, layer):
        ctx.save_for_backward(codes)
        ctx.layer, ctx.bias_shape = layer, None if bias is None else bias.shape
        return F.linear(x, layer.decode(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_output):
        ctx.saved_tensors  # noqa: B018 (checks the codes were not modified in place)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_output.matmul(ctx.layer.decode(grad_output.dtype).to(grad_output.device))
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).reshape(ctx.bias_shape)
        return grad_x, None, grad_bias, None


class _DequantizedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, codes, bias, conv):
        ctx.save_for_backward(codes)
        ctx.conv, ctx.input_shape = conv, x.shape
        return F.conv2d(x, conv.decode(x.dtype), bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx, grad_output):
        ctx.saved_tensors  # noqa: B018
        conv = ctx.conv
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = conv.decode(grad_output.dtype).to(grad_output.device)
            grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad_output, conv.stride, conv.padding, conv.dilation, conv.groups)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum((0, 2, 3))
        return grad_x, None, grad_bias, None


def _dequantized_state(module, state_dict, prefix, local_metadata):
    key = prefix + "weight"
    if key in state_dict and isinstance(module, _Quantized):
        state_dict[key] = module.decode(torch.float32)  # exact: codes × scales
    return state_dict


def _quantize_loaded_state(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    key = prefix + "weight"
    value = state_dict.get(key)
    if value is not None and isinstance(module, _Quantized) and value.is_floating_point() and value.shape == module.weight_shape:
        codes, scales = module.codec.encode(value)
        state_dict[key] = codes
        module.quant_scales = {k: v.to(module._parameters["weight"].device) for k, v in scales.items()}


# ------------------------------------------------------------------------------------------------ models


def quantize(root: nn.Module, mode: str) -> int:
    """Store the frozen weights of every plain nn.Linear (and, except in `fp8`, nn.Conv2d) under `root` in
    `mode`; returns how many layers changed. Biases, norms and embeddings keep their dtype. Layers already
    quantized are left as they are."""
    if mode not in MODES:
        raise ValueError(f"--base_quant {mode}: expected one of {', '.join(MODES)}")
    if mode == "fp8":
        return to_fp8(root)
    codec, count = CODECS[mode], 0
    for module in root.modules():
        quantized = QUANTIZED_OF.get(type(module))
        if quantized is None:
            continue
        module.__class__ = quantized
        module._quantize(codec)
        count += 1
    return count


def quantized_bytes(root: nn.Module) -> int:
    """The bytes the quantized layers under `root` store (codes and scales)."""
    total = 0
    for module in root.modules():
        if isinstance(module, _Quantized):
            tensors = [module._parameters["weight"], *module.quant_scales.values()]
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, _Quantized)


def holds_fp8(root: nn.Module) -> bool:
    """Whether `root` already stores float8 linears (`--fp8_base`, applied by a family as it loads)."""
    return any(isinstance(module, Fp8Linear) for module in root.modules())


def dequantized_copy(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """W as `mode` would store and return it (float32), the weight itself untouched."""
    if mode == "fp8":
        return weight.detach().to(torch.float8_e4m3fn).float()
    codes, scales = CODECS[mode].encode(weight.detach())
    return CODECS[mode].decode(codes, scales, weight.shape, torch.float32)


def relative_weight_error(root: nn.Module, mode: str) -> float:
    """‖W − dequant(quant(W))‖ / ‖W‖ over every layer `quantize` would change under `root` (nothing is changed)."""
    error = total = 0.0
    for module in root.modules():
        if type(module) in QUANTIZED_OF and (mode != "fp8" or type(module) is nn.Linear):
            weight = module.weight.detach().float()
            error += float((dequantized_copy(weight, mode) - weight).pow(2).sum())
            total += float(weight.pow(2).sum())
    return (error / total) ** 0.5 if total else 0.0
