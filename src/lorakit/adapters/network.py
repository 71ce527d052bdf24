"""A set of adapter modules attached to a model, with kohya naming, parameter groups and strict loading.

The network is built from the `AdapterTarget` list a model family hands over; it knows nothing about which
architecture it adapts. Each module is registered under its kohya name (`lora_unet_…`, `lora_te…`,
`oft_unet_…`), so `network.state_dict()` already is the kohya layout and `.to()` moves every adapter at once.
Plain LoRA modules are made by default; any other algorithm comes in through `module_factory`, a callable
that turns one `AdapterTarget` into an `AdapterModule` (see `factory.py`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lorakit.adapters.base import AdapterModule
from lorakit.adapters.lora import LoRAModule
from lorakit.errors import CheckpointError
from lorakit.adapters.targets import AdapterTarget

__all__ = ["COMPONENTS", "LoRANetwork", "loraplus_split"]

COMPONENTS = ("text_encoder", "unet")
_GROUP_NAMES = {"text_encoder": "textencoder", "unet": "unet"}
ModuleFactory = Callable[[AdapterTarget], AdapterModule]


#: a kohya name's prefix up to its first block number (`lora_te1_`, `lora_unet_down_blocks_`): enough to tell
#: which model family's names a file holds
_NAME_PREFIX = re.compile(r"^(lora_te\d*_|(?:lora|oft)_unet_[a-z_]+?_(?=\d))")
#: names the model family of a list of kohya module names (None when they say nothing)
DescribeNames = Callable[[list[str]], "str | None"]


def _name_prefixes(names: Iterable[str]) -> list[str]:
    """The kohya prefixes that tell model families apart (`lora_te_`, `lora_te1_`, `lora_unet_input_blocks_`, ...)."""
    found = {match.group(1) for name in names if (match := _NAME_PREFIX.match(name))}
    return sorted(found, key=lambda p: (not p.startswith("lora_te"), p))


def _family_hint(file_names: Iterable[str], own_names: Iterable[str], describe: DescribeNames | None) -> str:
    """`; this file has lora_te_ keys (an SD 1.x/2.x LoRA); this model's LoRA uses lora_te1_, lora_te2_ ...`
    when the file's names come from another model family than this network's, else ''."""
    file_names, own_names = list(file_names), list(own_names)
    theirs, ours = _name_prefixes(file_names), _name_prefixes(own_names)
    if not theirs or set(theirs) <= set(ours):
        return ""
    family = describe(file_names) if describe else None
    own_family = describe(own_names) if describe else None
    what = f" ({'an' if family and family[0] in 'S' else 'a'} {family} LoRA)" if family else ""
    own = f" ({own_family})" if own_family and own_family != family else ""
    return f"; this file has {', '.join(theirs)} keys{what}; this model's LoRA uses {', '.join(ours)} keys{own}"


def _split_key(key: str) -> tuple[str, str]:
    """`lora_unet_x.lora_down.weight` -> (`lora_unet_x`, `lora_down.weight`)."""
    name, _, suffix = key.partition(".")
    return name, suffix


def _split_by_prefix(names: Sequence[str], lrs: Mapping[str, float | None], fallback_lr: float | None
                     ) -> list[tuple[str, list[str], float | None]]:
    """(description, module names, LR) per prefix of `lrs` (`lora_te2` -> `textencoder2`), then the rest."""
    parts: list[tuple[str, list[str], float | None]] = []
    taken: set[str] = set()
    for prefix, lr in lrs.items():
        stem = prefix.rstrip("_")
        members = [n for n in names if n.startswith(stem + "_") and n not in taken]
        taken.update(members)
        number = stem[len("lora_te"):] if stem.startswith("lora_te") else stem
        parts.append((_GROUP_NAMES["text_encoder"] + number, members, fallback_lr if lr is None else lr))
    rest = [n for n in names if n not in taken]
    parts.append((_GROUP_NAMES["text_encoder"], rest, fallback_lr))
    return parts


def _split_by_regex(names: Sequence[str], reg_lrs: Sequence[tuple[str, float]], lr: float | None
                    ) -> list[tuple[str, list[str], float | None]]:
    """(description suffix, module names, LR): one part per pattern of `reg_lrs` that takes a module (the first
    that `re.search`es its name), ordered as sd-scripts sorts `reg_lr_<index>`, then the rest at `lr`."""
    taken: dict[int, list[str]] = {}
    rest: list[str] = []
    for name in names:
        index = next((i for i, (pattern, _) in enumerate(reg_lrs) if re.search(pattern, name)), None)
        (rest if index is None else taken.setdefault(index, [])).append(name)
    parts = [(f" reg_lr_{i}", taken[i], reg_lrs[i][1]) for i in sorted(taken, key=str)]
    return parts + [("", rest, lr)]


def loraplus_split(modules: Sequence[AdapterModule], ratio: float | None) -> list[tuple[list, str, float]]:
    """The modules' trainable parameters as (parameters, description suffix, LR factor): one group, or with a
    LoRA+ ratio the rest and each module's `plus_parameters` (" plus", lr·ratio)."""
    if not ratio:
        return [([p for m in modules for p in m.parameters() if p.requires_grad], "", 1.0)]
    plus = [p for m in modules for p in m.plus_parameters()]
    plus_ids = {id(p) for p in plus}
    plain = [p for m in modules for p in m.parameters() if p.requires_grad and id(p) not in plus_ids]
    return [(plain, "", 1.0), (plus, " plus", float(ratio))]


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
        self.set_multiplier(multiplier)

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

    def before_optimizer_step(self) -> None:
        """Each module's look at the step's reduced and clipped gradients, before the optimizer step."""
        for module in self.lora_modules.values():
            module.before_optimizer_step()

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
        text_encoder_lrs: Mapping[str, float | None] | None = None,
        loraplus_lr_ratio: float | None = None,
        loraplus_unet_lr_ratio: float | None = None,
        loraplus_text_encoder_lr_ratio: float | None = None,
        reg_lrs: Sequence[tuple[str, float]] = (),
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Optimizer parameter groups and their descriptions, as sd-scripts' `prepare_optimizer_params`.

        Each component's group uses its own LR, or `default_lr` when that is None. A group whose LR ends up
        0 or None is dropped, so `text_encoder_lr=0` leaves the text-encoder LoRA untrained. With a LoRA+
        ratio (Hayou et al., "LoRA+", arXiv:2402.12354) the `lora_up` weights form a separate "… plus" group
        at lr·ratio; the component-specific ratio overrides the general one.

        `text_encoder_lrs` (kohya name prefix -> LR, in encoder order, e.g. `{"lora_te1": 1e-5, "lora_te2":
        2e-5, "lora_te3": None}`) splits the text-encoder modules into one group per prefix, described
        `textencoder1`, `textencoder2`, ... after the prefix's number (sd-scripts'
        `prepare_optimizer_params_with_multiple_te_lrs`). A prefix whose LR is None uses `text_encoder_lr`
        (or `default_lr`), and 0 drops that group, as above. Text-encoder modules under no listed prefix keep
        the plain `textencoder` group.

        `reg_lrs` (lora_flux's `network_reg_lrs`: (regex, LR) pairs) takes the modules whose name a pattern finds
        (the first pair that matches) out of each of those groups into a group of that LR, described with
        ` reg_lr_<index>`, placed before the group they came from (in the order of the index as a string, as
        sd-scripts sorts them); an LR of 0 drops such a group too.
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
            parts = [(_GROUP_NAMES[component], names, lr)]
            if component == "text_encoder" and text_encoder_lrs:
                parts = _split_by_prefix(names, text_encoder_lrs, lr)
            for description, part_names, part_lr in parts:
                for label, names_of_lr, lr_of in _split_by_regex(part_names, reg_lrs, part_lr):
                    if not names_of_lr or not lr_of:
                        continue
                    for params, suffix, factor in loraplus_split([getattr(self, n) for n in names_of_lr], ratio):
                        if params:
                            groups.append({"params": params, "lr": lr_of * factor})
                            descriptions.append(description + label + suffix)
        return groups, descriptions

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
            norm = float(module.delta_weight().norm())
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
    def load_kohya_state_dict(self, state_dict: Mapping[str, torch.Tensor], *, source: str,
                              describe: DescribeNames | None = None) -> list[str]:
        """Copy a kohya-format state dict into this network; returns warnings for modules the file lacks.

        Strict: a key for a module or tensor this network does not have, a shape mismatch, or a module with
        only some of its tensors raises `CheckpointError` naming `source`. A missing `alpha` means alpha = rank
        (what every loader assumes). `describe` names the model family of a list of module names, for the message
        when the file is another family's LoRA.
        """
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state_dict.items():
            name, suffix = _split_key(key)
            if name not in self._components:
                hint = _family_hint((_split_key(k)[0] for k in state_dict), self._components, describe)
                raise CheckpointError(f"{source}: key {key} is for a module this network does not have{hint}")
            by_module.setdefault(name, {})[suffix] = value
        warnings: list[str] = []
        for name, module in self.lora_modules.items():
            tensors = by_module.get(name)
            if tensors is None:
                warnings.append(f"{source}: no weights for {name}; it keeps its current values")
                continue
            warnings += module.load_adapter_tensors(tensors, source)
        return warnings
