"""Layer stand-ins shared by the transformer families (FLUX.1, SD3, Chroma, FLUX.2).

`FusedLinearView`: BFL's FLUX and SAI's SD3 fuse q/k/v (and, in FLUX single blocks, the MLP input) into one
Linear, and LoRA files name and shape their factors after that fused layer: one `lora_down` (r, in) and one
`lora_up` (3·d or 3·d + mlp, r). diffusers keeps the parts apart. The view stands for the fused layer so a
standard LoRA module can attach to it; each part then adds its rows of the fused LoRA output. The parts read
the same input tensor, so the LoRA branch runs once per block call and its output is shared (released after
the last part took its rows), which is exactly a LoRA on the fused layer.

`SplitQKVView` is the same view with one LoRA per part (sd-scripts' `split_qkv=True`), saved block-diagonally.

`to_fp8` (sd-scripts' `--fp8_base`): Linear weights stored as float8_e4m3fn and upcast per layer in forward,
halving the frozen model's memory against bf16. It works on the CPU as well, which the tests use.

`checkpoint_offloading_to_cpu` (sd-scripts' `--cpu_offload_checkpointing`): gradient checkpointing whose saved
block inputs wait in CPU memory.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.base import is_float8

FP8_DTYPE = torch.float8_e4m3fn


class FusedLinearView(nn.Linear):
    """A weightless stand-in for several Linears that read the same input, as one Linear over their stacked rows.

    Its own forward returns a zero the parts' outputs broadcast against, so with no adapter attached every part
    computes exactly what it did before; with a LoRA patched onto the view, the view's output is the LoRA delta.
    """

    def __init__(self, parts: Sequence[nn.Linear]):
        nn.Module.__init__(self)
        inputs = {part.in_features for part in parts}
        if len(inputs) != 1:
            raise ValueError(f"fused parts must share their input width, got {sorted(inputs)}")
        self.in_features = inputs.pop()
        self.out_features = sum(part.out_features for part in parts)
        self.bias = None
        object.__setattr__(self, "parts", list(parts))  # the model owns them; not submodules of the view
        object.__setattr__(self, "_cache", None)
        starts = [0]
        for part in parts:
            starts.append(starts[-1] + part.out_features)
        self.slices = [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]
        for index, part in enumerate(parts):
            _route_part(part, self, index)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The fused weight (a fresh concatenation: read it, never write into it). Float8 parts (`--fp8_base`)
        are upcast to float32 (exactly), the precision adapters do their math in: float8 tensors cannot be
        concatenated under autocast, nor take part in arithmetic."""
        dtype = self.parts[0].weight.dtype
        if is_float8(self.parts[0].weight) or any(part.weight.dtype != dtype for part in self.parts):
            dtype = torch.float32
        return torch.cat([part.weight.to(dtype) for part in self.parts], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(())

    def delta_for(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """The rows of the (possibly adapted) view's output that belong to part `index`, computed once per input."""
        cache = self._cache
        if cache is None or cache[0] is not x:
            cache = [x, self(x), len(self.parts)]
        cache[2] -= 1
        object.__setattr__(self, "_cache", cache if cache[2] > 0 else None)
        delta = cache[1]
        return delta if delta.ndim == 0 else delta[..., self.slices[index]]

    @torch.no_grad()
    def add_to_parts(self, delta_weight: torch.Tensor) -> None:
        """Merge a fused ΔW into the parts' weights, each taking its rows."""
        for part, rows in zip(self.parts, self.slices):
            weight = part.weight
            if hasattr(part, "store_weight"):  # a quantized part (--base_quant) holds W' dequantized
                part.store_weight(weight.float() + delta_weight[rows].to(weight.device).float())
                continue
            weight.copy_((weight.float() + delta_weight[rows].to(weight.device).float()).to(weight.dtype))


class SplitQKVView(FusedLinearView):
    """A fused view whose attached LoRA is one independent rank-r LoRA per part (sd-scripts' `split_qkv=True`).

    The adapter is built at rank (parts·r) with alpha (parts·α). Its up matrix is kept block-diagonal — part j's
    rows read only columns [j·r, (j+1)·r) — by zeroing the other entries as it attaches and masking their
    gradients, so its down rows [j·r, (j+1)·r) and that up block are part j's own LoRA and its scale
    parts·α / (parts·r) is each part's α/r. Saved as it is, this is the block-diagonal layout sd-scripts writes
    and kohya readers split (diffusers recognises it by its zero blocks); sd-scripts keeps alpha at α instead,
    which makes its files load at 1/parts of their trained strength. Parts may differ in width (FLUX's linear1:
    q, k, v, then the 4× wider MLP input).
    """

    #: its adapter is one LoRA per part: the algorithms that treat a layer as a whole (LoRA-GGPO) leave it be
    independent_parts = True

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        adapter = getattr(value, "__self__", None)
        if name == "forward" and isinstance(getattr(adapter, "lora_up", None), nn.Module):
            self._keep_block_diagonal(adapter.lora_up.weight)

    def _keep_block_diagonal(self, up: torch.Tensor) -> None:
        if getattr(up, "_lorakit_block_mask", None) is not None:
            return
        mask = block_diagonal_mask(self.slices, up.shape[1]).to(up.device)
        with torch.no_grad():
            up.mul_(mask.to(up.dtype))
        up._lorakit_block_mask = mask
        # zero gradients keep zero entries zero under every Adam/Lion/SGD-style update and decoupled decay
        up.register_hook(lambda grad: grad * mask.to(device=grad.device, dtype=grad.dtype))


def block_diagonal_mask(row_slices: Sequence[slice], rank: int) -> torch.Tensor:
    """(rows, rank) ones on the diagonal blocks: the rows of part j read only the j-th rank/parts columns."""
    parts = len(row_slices)
    if rank % parts:
        raise ValueError(f"a split LoRA needs a rank divisible by its {parts} parts, got {rank}")
    cols = rank // parts
    mask = torch.zeros(row_slices[-1].stop, rank)
    for j, rows in enumerate(row_slices):
        mask[rows, j * cols:(j + 1) * cols] = 1.0
    return mask


def _route_part(part: nn.Linear, view: FusedLinearView, index: int) -> None:
    """Make `part` add its rows of the view's output; any forward already patched on it is kept and chained."""
    inner = part.__dict__.get("forward", part.forward)

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = inner(x)
        return out + view.delta_for(x, index).to(out.dtype)

    part.forward = forward


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class _StaysFloat8:
    """`.to(dtype)` on the model (the trainer casts frozen modules to the mixed-precision dtype) would upcast the
    weight for good; `_apply` puts it back into float8, which is exact because every e4m3 value is
    representable in fp16, bf16 and fp32."""

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)  # type: ignore[misc]
        if self.weight.dtype != FP8_DTYPE:
            self.weight.data = self.weight.data.to(FP8_DTYPE)
        return self


class Fp8Linear(_StaysFloat8, nn.Linear):
    """nn.Linear whose weight is stored in float8 and cast to the compute dtype for each call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.weight.requires_grad:  # never for --fp8_base; kept correct for a weight someone unfroze
            return F.linear(x.to(dtype), self.weight.to(dtype), bias)
        return _LinearRecastingWeight.apply(x.to(dtype), self.weight, bias)


class Fp8Conv2d(_StaysFloat8, nn.Conv2d):
    """nn.Conv2d whose weight is stored in float8 and cast to the compute dtype for each call (the U-Net
    families' `--fp8_base`, which stores the U-Net's convolutions in float8 as sd-scripts does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.weight.requires_grad or self.padding_mode != "zeros":
            return self._conv_forward(x.to(dtype), self.weight.to(dtype), bias)
        return _Conv2dRecastingWeight.apply(x.to(dtype), self.weight, bias, self)


class _LinearRecastingWeight(torch.autograd.Function):
    """F.linear with a frozen low-precision weight that saves the stored weight for backward, not its upcast.

    Plain autograd would keep every layer's compute-dtype copy of the weight until backward (twice the float8
    bytes for the whole model), and, with --blocks_to_swap, keep the copies of swapped-out blocks on the
    device. Saving the Parameter itself means backward reads whatever storage it has then: the block swap has
    brought the block back by that time, and a block on the CPU holds nothing on the device meanwhile.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: nn.Parameter, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.compute_dtype = x.dtype
        ctx.bias_shape = None if bias is None else bias.shape
        return F.linear(x, weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_output.matmul(weight.to(device=grad_output.device, dtype=grad_output.dtype))
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).reshape(ctx.bias_shape)
        return grad_x, None, grad_bias


class _Conv2dRecastingWeight(torch.autograd.Function):
    """`_LinearRecastingWeight` for a zero-padded convolution: backward upcasts the stored weight again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: nn.Parameter, bias: torch.Tensor | None, conv: nn.Conv2d) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.conv, ctx.input_shape = conv, x.shape
        return F.conv2d(x, weight.to(x.dtype), bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (weight,) = ctx.saved_tensors
        conv = ctx.conv
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(
                ctx.input_shape, weight.to(device=grad_output.device, dtype=grad_output.dtype), grad_output,
                conv.stride, conv.padding, conv.dilation, conv.groups,
            )
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum((0, 2, 3))
        return grad_x, None, grad_bias, None


def to_fp8(root: nn.Module, *, convolutions: bool = False) -> int:
    """Store every plain nn.Linear weight under `root` (and with `convolutions` every nn.Conv2d's) in
    float8_e4m3fn; returns how many layers changed.

    Biases, norms and embeddings keep their dtype (sd-scripts keeps norms and embeddings out of fp8 too).
    """
    count = 0
    for module in root.modules():
        kind = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d if convolutions else None}.get(type(module))
        if kind is not None:
            module.__class__ = kind
            module.weight.requires_grad_(False)
            module.weight.data = module.weight.data.to(FP8_DTYPE)
            count += 1
    return count


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


def fp8_parts(cfg) -> str | None:
    """Which frozen parts store float8 weights: `--fp8_base_unet` the denoiser's, `--fp8_base` the text
    encoders' too (each family says which of its encoders)."""
    if cfg.fp8_base_unet:
        return "denoiser"
    return "all" if cfg.fp8_base else None
