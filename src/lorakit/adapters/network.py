"""A set of adapter modules attached to a model, with kohya naming, parameter groups and strict loading.

The network is built from the `AdapterTarget` list a model family hands over; it knows nothing about which
architecture it adapts. Each module is registered under its kohya name (`lora_unet_…`, `lora_te…`,
`oft_unet_…`), so `network.state_dict()` already is the kohya layout and `.to()` moves every adapter at once.
Plain LoRA modules are made by default; any other algorithm comes in through `module_factory`, a callable
that turns one `AdapterTarget` into an `AdapterModule` (see `factory.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lorakit.adapters.base import AdapterModule
from lorakit.adapters.lora import LoRAModule, lora_delta_weight
from lorakit.errors import CheckpointError
from lorakit.families.base import AdapterTarget

__all__ = ["COMPONENTS", "LoRANetwork"]

COMPONENTS = ("text_encoder", "unet")
_GROUP_NAMES = {"text_encoder": "textencoder", "unet": "unet"}
ModuleFactory = Callable[[AdapterTarget], AdapterModule]


def _split_key(key: str) -> tuple[str, str]:
    """`lora_unet_x.lora_down.weight` -> (`lora_unet_x`, `lora_down.weight`)."""
    name, _, suffix = key.partition(".")
    return name, suffix


class LoRANetwork(nn.Module):
    """Adapter modules for a list of targets; `apply_to()` attaches them, `restore()` detaches them."""

    def __init__(
        self,
        targets: Sequence[AdapterTarget],
        *,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        module_factory: ModuleFactory | None = None,
    ):
        super().__init__()
        self._components: dict[str, str] = {}
        if module_factory is None:
            def module_factory(target: AdapterTarget) -> AdapterModule:
                return LoRAModule(
                    target.name, target.module, target.rank, target.alpha, multiplier=multiplier,
                    dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
                )
        for target in targets:
            self._add_target(target, module_factory)
        self.multiplier = float(multiplier)
        for module in self.lora_modules.values():
            module.multiplier = self.multiplier

    def _add_target(self, target: AdapterTarget, module_factory: ModuleFactory) -> None:
        if target.component not in COMPONENTS:
            raise ValueError(f"{target.name}: component must be one of {COMPONENTS}, got {target.component!r}")
        if "." in target.name or not target.name:
            raise ValueError(f"invalid LoRA module name {target.name!r} (kohya names contain no dots)")
        if target.name in self._components:
            raise ValueError(f"two adapter targets share the name {target.name}")
        module = module_factory(target)
        self.add_module(target.name, module)
        self._components[target.name] = target.component

    # ------------------------------------------------------------------ access

    @property
    def lora_modules(self) -> dict[str, AdapterModule]:
        """Every adapter module by kohya name, in target order."""
        return {name: getattr(self, name) for name in self._components}

    def component_of(self, name: str) -> str:
        return self._components[name]

    def num_modules_by_component(self) -> dict[str, int]:
        counts = {component: 0 for component in COMPONENTS}
        for component in self._components.values():
            counts[component] += 1
        return counts

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ attach / detach

    def apply_to(self) -> None:
        for module in self.lora_modules.values():
            module.apply_to()

    def restore(self) -> None:
        for module in self.lora_modules.values():
            module.restore()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for module in self.lora_modules.values():
            module.multiplier = self.multiplier

    @torch.no_grad()
    def merge_to_base(self, multiplier: float | None = None) -> None:
        """Fold every ΔW into the base weights (at `multiplier`, default the network's) and detach the branches."""
        factor = self.multiplier if multiplier is None else float(multiplier)
        for module in self.lora_modules.values():
            module.merge_to_base(factor)

    # ------------------------------------------------------------------ optimizer

    def prepare_optimizer_params(
        self,
        text_encoder_lr: float | None,
        unet_lr: float | None,
        default_lr: float,
        *,
        loraplus_lr_ratio: float | None = None,
        loraplus_unet_lr_ratio: float | None = None,
        loraplus_text_encoder_lr_ratio: float | None = None,
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Optimizer parameter groups and their descriptions, as sd-scripts' `prepare_optimizer_params`.

        Each component's group uses its own LR, or `default_lr` when that is None. A group whose LR ends up
        0 or None is dropped, so `text_encoder_lr=0` leaves the text-encoder LoRA untrained. With a LoRA+
        ratio (Hayou et al., "LoRA+", arXiv:2402.12354) the `lora_up` weights form a separate "… plus" group
        at lr·ratio; the component-specific ratio overrides the general one.
        """
        settings = {
            "text_encoder": (text_encoder_lr, loraplus_text_encoder_lr_ratio or loraplus_lr_ratio),
            "unet": (unet_lr, loraplus_unet_lr_ratio or loraplus_lr_ratio),
        }
        groups: list[dict[str, Any]] = []
        descriptions: list[str] = []
        for component in COMPONENTS:
            own_lr, ratio = settings[component]
            lr = default_lr if own_lr is None else own_lr
            names = [n for n, c in self._components.items() if c == component]
            if not names or not lr:
                continue
            for params, suffix, factor in self._split_for_loraplus(names, ratio):
                if params:
                    groups.append({"params": params, "lr": lr * factor})
                    descriptions.append(_GROUP_NAMES[component] + suffix)
        return groups, descriptions

    def _split_for_loraplus(self, names: Iterable[str], ratio: float | None) -> list[tuple[list, str, float]]:
        modules = [getattr(self, n) for n in names]
        if not ratio:
            return [([p for m in modules for p in m.parameters() if p.requires_grad], "", 1.0)]
        plus = [p for m in modules for p in m.plus_parameters()]
        plus_ids = {id(p) for p in plus}
        plain = [p for m in modules for p in m.parameters() if p.requires_grad and id(p) not in plus_ids]
        return [(plain, "", 1.0), (plus, " plus", float(ratio))]

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """Rescale every module whose ‖ΔW‖_F exceeds `max_norm` (sd-scripts `--scale_weight_norms`).

        Returns (number of modules scaled, mean norm after scaling, largest norm before scaling). Both
        factors are multiplied by √ratio, so ΔW shrinks by `ratio` = max_norm / ‖ΔW‖.
        """
        scaled, norms, largest = 0, [], 0.0
        for module in self.lora_modules.values():
            if not isinstance(module, LoRAModule):
                continue  # the rule is defined on the two LoRA factors only
            norm = float(lora_delta_weight(module.lora_down.weight, module.lora_up.weight, module.alpha).norm())
            largest = max(largest, norm)
            clipped = max(norm, max_norm / 2)
            ratio = min(clipped, max_norm) / clipped
            if ratio != 1.0:
                module.lora_down.weight.mul_(ratio**0.5)
                module.lora_up.weight.mul_(ratio**0.5)
                scaled += 1
            norms.append(norm * ratio)
        mean = sum(norms) / len(norms) if norms else 0.0
        return scaled, mean, largest

    # ------------------------------------------------------------------ kohya state dict

    def state_dict_kohya(self) -> dict[str, torch.Tensor]:
        """Every module's tensors under `<name>.<tensor>` (`.lora_down.weight`, `.alpha`, `.oft_blocks`, ...)."""
        return {
            f"{name}.{suffix}": value
            for name, module in self.lora_modules.items()
            for suffix, value in module.adapter_state_dict().items()
        }

    @torch.no_grad()
    def load_kohya_state_dict(self, state_dict: Mapping[str, torch.Tensor], *, source: str) -> list[str]:
        """Copy a kohya-format state dict into this network; returns warnings for modules the file lacks.

        Strict: a key for a module or tensor this network does not have, a shape mismatch, or a module with
        only some of its tensors raises `CheckpointError` naming `source`. A missing `alpha` means alpha = rank
        (what every loader assumes).
        """
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state_dict.items():
            name, suffix = _split_key(key)
            if name not in self._components:
                raise CheckpointError(f"{source}: key {key} is for a module this network does not have")
            by_module.setdefault(name, {})[suffix] = value
        warnings: list[str] = []
        for name, module in self.lora_modules.items():
            tensors = by_module.get(name)
            if tensors is None:
                warnings.append(f"{source}: no weights for {name}; it keeps its current values")
                continue
            warnings += module.load_adapter_tensors(tensors, source)
        return warnings
