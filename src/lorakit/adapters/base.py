"""The adapter interface every algorithm implements, and the forward patching they share.

An adapter is attached beside one frozen layer of the base model (an `nn.Linear`, an `nn.Conv2d`, or for some
LyCORIS algorithms a norm layer). Whatever the algorithm, it offers:

* `delta_weight()`: W' − W at multiplier 1, in the layer's weight shape, in float32 or wider;
* `merged_weight(multiplier)`: W' at that multiplier (W + m·ΔW for additive algorithms; DoRA and OFT are not
  additive in m and override it);
* `forward(x)`: the training-time ("bypass") forward that `apply_to()` patches onto the layer;
* `adapter_state_dict()`: its tensors under the names the file format uses (without the module name).

The wrapped layer is kept out of `nn.Module`'s registry: it belongs to the base model, and the adapter's state
dict must hold only the adapter's tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lorakit.errors import CheckpointError

__all__ = ["AdapterModule", "base_weight", "branch_input", "check_probability", "dequantized", "is_float8",
           "is_fused_view", "write_merged_weight"]


def is_float8(tensor: torch.Tensor) -> bool:
    """A float8 tensor (`--fp8_base` stores frozen weights so): no arithmetic but casts works on it."""
    return tensor.is_floating_point() and tensor.element_size() == 1


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """A weight ready for arithmetic: float8 (`--fp8_base`) upcast to float32, which is exact (every float8 value
    is a float32 value) and is the precision the adapters compute merges in; any other weight as stored."""
    return weight.float() if is_float8(weight) else weight


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The frozen layer's weight W for an adapter's math (`dequantized`). A merge is written back into the
    stored dtype by `write_merged_weight`."""
    return dequantized(layer.weight)


def branch_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The layer input as the adapter's own weights take it.

    Under autocast the adapter's matmuls cast `x` themselves (to the autocast dtype), so it is passed as it is: a
    cast to the adapters' float32 first would copy every adapted layer's activation to float32 and back, twice
    per step (forward and backward). Without autocast (a half-precision base with float32 adapters, e.g. at
    inference) the dtypes must match, so it is cast.
    """
    if x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(dtype)


def check_probability(name: str, value: float | None) -> float:
    p = float(value or 0.0)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return p


def is_fused_view(layer: nn.Module) -> bool:
    """True for a weightless stand-in over layers the model keeps apart (FLUX/SD3 fused q/k/v, SAI row order).

    Such a view (`families/common/layers.py`) returns zero from its own forward and its parts add the view's
    patched output to theirs, so an adapter on it must return only its change of the output; a merge goes to
    the parts through `add_to_parts`.
    """
    return hasattr(layer, "add_to_parts")


@torch.no_grad()
def write_merged_weight(layer: nn.Module, merged: torch.Tensor) -> None:
    """Store W' in `layer` (in its dtype); a fused view hands W' − W to its parts, each taking its rows."""
    if is_fused_view(layer):
        layer.add_to_parts(merged.float() - layer.weight.float())
        return
    if hasattr(layer, "store_weight"):  # a quantized layer (--base_quant): it holds W' dequantized from then on
        layer.store_weight(merged)
        return
    weight = layer.weight
    weight.copy_(merged.to(device=weight.device, dtype=weight.dtype))


class AdapterModule(nn.Module):
    """Base class: forward patching (`apply_to`/`restore`), merging, and strict loading of own tensors."""

    #: tensors a file may omit for this module (filled with a default by `fill_missing`)
    optional_tensors: tuple[str, ...] = ()

    def __init__(self, name: str, org_module: nn.Module, multiplier: float = 1.0):
        super().__init__()
        self.lora_name = name
        self.multiplier = float(multiplier)
        # kept out of nn.Module's registry: it is the base model's layer, not part of the adapter.
        object.__setattr__(self, "org_module", org_module)
        object.__setattr__(self, "_org_forward", None)
        object.__setattr__(self, "_patched_forward", None)

    # ------------------------------------------------------------------ patching

    @property
    def is_applied(self) -> bool:
        return self._org_forward is not None

    def apply_to(self) -> None:
        """Route the wrapped layer's forward through this module (idempotent)."""
        if self.is_applied:
            return
        # A forward already patched onto the instance (another adapter, a hook library) is kept and chained.
        object.__setattr__(self, "_patched_forward", self.org_module.__dict__.get("forward"))
        object.__setattr__(self, "_org_forward", self.org_module.forward)
        self.org_module.forward = self.forward

    def restore(self) -> None:
        """Give the wrapped layer its own forward back (idempotent)."""
        if not self.is_applied:
            return
        if self._patched_forward is not None:
            self.org_module.forward = self._patched_forward
        else:
            # apply_to set an instance attribute; deleting it re-exposes the class's forward.
            del self.org_module.forward
        object.__setattr__(self, "_org_forward", None)

    def original_forward(self, x: torch.Tensor) -> torch.Tensor:
        forward = self._org_forward if self._org_forward is not None else self.org_module.forward
        return forward(x)

    # ------------------------------------------------------------------ math

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def merged_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        """W + m·ΔW in float32 (or wider); the layer's own dtype is applied by `merge_to_base`."""
        weight = base_weight(self.org_module)
        delta = self.delta_weight().to(device=weight.device)
        return weight.to(delta.dtype) + multiplier * delta

    @torch.no_grad()
    def merge_to_base(self, multiplier: float = 1.0) -> None:
        """Write the merged weight into the wrapped layer and detach the branch (so it is not counted twice)."""
        write_merged_weight(self.org_module, self.merged_weight(multiplier))
        self.restore()

    def plus_parameters(self) -> list[nn.Parameter]:
        """Parameters that LoRA+ trains at a higher learning rate (the "up" side); none by default."""
        return []

    def before_optimizer_step(self) -> None:
        """Read the step's finished gradients before the optimizer uses them (LoRA-GGPO); nothing by default."""

    # ------------------------------------------------------------------ tensors

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under their file names relative to this module (`lora_down.weight`, `oft_blocks`, ...)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def expected_tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors a file's values are copied into, by the same names."""
        return dict(self.state_dict(keep_vars=True))

    def fill_missing(self, suffix: str) -> str:
        """Give an optional tensor missing from a file its default; returns the warning to show."""
        raise NotImplementedError

    def after_load(self) -> None:
        """Refresh anything derived from the loaded tensors."""

    @torch.no_grad()
    def load_adapter_tensors(self, tensors: Mapping[str, torch.Tensor], source: str) -> list[str]:
        """Copy a file's tensors for this module; strict on names and shapes, lenient only on `optional_tensors`."""
        targets = self.expected_tensors()
        warnings: list[str] = []
        for suffix, value in tensors.items():
            key = f"{self.lora_name}.{suffix}"
            if suffix not in targets:
                raise CheckpointError(
                    f"{source}: key {key} is not a tensor of this {type(self).__name__} "
                    f"(expected {', '.join(sorted(targets))})"
                )
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{source}: key {key} holds {type(value).__name__}, not a tensor")
            self._copy_one(key, targets[suffix], value, source)
        missing = [s for s in targets if s not in tensors]
        required = [s for s in missing if s not in self.optional_tensors]
        if required:
            raise CheckpointError(f"{source}: {self.lora_name} has no {' or '.join(required)}")
        for suffix in missing:
            warnings.append(f"{source}: {self.fill_missing(suffix)}")
        self.after_load()
        return warnings

    @staticmethod
    def _copy_one(key: str, target: torch.Tensor, value: torch.Tensor, source: str) -> None:
        # some writers store 0-d scalars (alpha) as shape (1,)
        fits = value.shape == target.shape or (target.dim() == 0 and value.numel() == 1)
        if not fits:
            raise CheckpointError(
                f"{source}: key {key} has shape {tuple(value.shape)} but this network expects {tuple(target.shape)}"
            )
        target.data.copy_(value.reshape(target.shape).to(device=target.device, dtype=target.dtype))
