"""The LoRA targets of a loaded model, by kohya name, for the tools that read or change base weights.

A family's trainer already knows which kohya name lives where (`adapter_targets`): SD/SDXL names map onto one
diffusers layer each (SGM paths for SDXL), while SD3 and FLUX names stand for SAI/BFL layers that diffusers
keeps apart (`FusedLinearView` over q/k/v, `SwappedRowsView` over a modulation stored in the other half
order). The tools reuse that list instead of re-deriving it: `ToolTarget.weight()` reads the weight in the
file's shape and row order and `ToolTarget.add()` adds a ΔW given in that order to the real layers.

Views install forward hooks on the parts they stand for; `model_targets` removes them again on exit, so a
model the tools touched behaves exactly as before (the merged weights aside).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from lorakit.adapters.factory import lycoris_network_targets
from lorakit.adapters.spec import make_target_spec
from lorakit.families.base import Components, ModelFamily

log = logging.getLogger("lorakit.tools")

__all__ = ["ToolTarget", "forwards_restored", "model_targets", "named_layers"]


@dataclass
class ToolTarget:
    """One LoRA-able layer: `module` is the layer itself or the family's view standing for a fused/swapped one."""

    name: str
    module: nn.Module
    component: str

    def weight(self) -> torch.Tensor:
        """The weight in the LoRA file's shape and row order (views build it from their parts)."""
        return self.module.weight

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape, without building a view's weight (a concatenation of its parts)."""
        if isinstance(self.module, nn.Linear):
            return (self.module.out_features, self.module.in_features)
        return tuple(self.module.weight.shape)

    @property
    def device(self) -> torch.device:
        """Where the weight lives (a view's: where its parts live)."""
        parts = getattr(self.module, "parts", None)
        return (parts[0] if parts else self.module).weight.device

    @torch.no_grad()
    def add(self, delta: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
        """W ← W + ΔW, summed in `dtype` (at least float32) and cast back to the weight's own dtype once."""
        if hasattr(self.module, "add_to_parts"):
            self.module.add_to_parts(delta)
            return
        weight = self.module.weight
        work = torch.promote_types(dtype, torch.float32)
        merged = weight.to(device=delta.device, dtype=work) + delta.to(work).reshape(weight.shape)
        weight.copy_(merged.to(device=weight.device, dtype=weight.dtype))


def _forwards(roots: list[nn.Module]) -> list[tuple[nn.Module, object]]:
    """Every module's instance-level `forward` (a patched one, or the marker that there is none)."""
    return [(m, m.__dict__.get("forward", _NONE)) for root in roots for m in root.modules()]


_NONE = object()


def _restore(saved: list[tuple[nn.Module, object]]) -> None:
    for module, forward in saved:
        if forward is _NONE:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = forward


@contextmanager
def forwards_restored(roots: list[nn.Module]) -> Iterator[None]:
    """Every module under `roots` gets back the `forward` it had on entry: listing a family's targets makes the
    FLUX/SD3 fused q/k/v views route their parts' forwards, which a model that is only merged into must not keep."""
    saved = _forwards(roots)
    try:
        yield
    finally:
        _restore(saved)


@contextmanager
def model_targets(
    family: ModelFamily, components: Components, network_args: dict[str, str] | None = None
) -> Iterator[dict[str, ToolTarget]]:
    """The model's LoRA targets by kohya name. With `network_args` None, every layer a file of the family may
    name (`family.all_layers_args`: the embedders, T5 and 3x3 convs included); otherwise the targets a training
    run with those `--network_args` would create. Text encoders missing from `components` (None) are simply not
    listed."""
    encoders = list(components.text_encoders)
    present = [e for e in encoders if e is not None]
    # a missing encoder stands as an empty module: the family then finds no layers in it
    view = replace(components, text_encoders=[e if e is not None else nn.Module() for e in encoders])
    args = dict(family.all_layers_args if network_args is None else network_args)
    spec = make_target_spec(family, rank=1, alpha=1.0, args=args, train_text_encoder=bool(present))
    with forwards_restored([components.denoiser, *present]):
        targets = family.adapter_targets(view, spec)
        yield {t.name: ToolTarget(t.name, t.module, t.component) for t in targets}


def named_layers(family: ModelFamily, components: Components) -> dict[str, nn.Module]:
    """Every layer a LoRA file of the family may name, by kohya name, whatever network wrote it: the family's
    LoRA targets (`all_layers_args`), the layers a LyCORIS `preset=full` network with norms names (other names
    than networks.lora on some families, e.g. SDXL's `input_blocks_0_0`), and for plain-path layouts every
    Linear/Conv2d. Call inside `forwards_restored` (listing targets makes the fused views)."""
    encoders = [e if e is not None else nn.Module() for e in components.text_encoders]
    view = replace(components, text_encoders=encoders)
    layout = family.lora_layout
    found = dict(layout.module_index(components)) if layout.model_roots is not None else {}
    try:
        spec = make_target_spec(family, module="lycoris.kohya", rank=1, alpha=1.0,
                                args={"preset": "full", "train_norm": "True"}, train_text_encoder=any(components.text_encoders))
        found.update({t.name: t.module for t in lycoris_network_targets(spec, family, view)})
    except Exception as error:  # noqa: BLE001 - without lycoris-lora (or a family without presets) these names are not listed
        log.debug("LyCORIS layer names not listed: %s", error)
    spec = make_target_spec(family, rank=1, alpha=1.0, args=dict(family.all_layers_args), train_text_encoder=any(components.text_encoders))
    found.update({t.name: t.module for t in family.adapter_targets(view, spec)})
    return found
