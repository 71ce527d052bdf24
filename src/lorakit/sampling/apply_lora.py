"""Merge LoRA files into a loaded model for inference: `W ← W + m·ΔW` per layer, exact and free at sampling time.

Nothing here knows a module naming: the layers come from the family's own `adapter_targets` (the ones training
attaches to, fused FLUX/SD3 views included), the file's tensors are loaded by the trainer's strict
`LoRANetwork.load_kohya_state_dict`, and ΔW comes from each adapter module's own math (`merged_weight`). A file
written by any trainer network therefore merges the way it trained.

Ranks and alphas are read from each file's tensors, so several files of different ranks (or one file with
per-layer ranks, e.g. after `lora resize --dynamic_method`) merge one after the other. Which adapter algorithm a
file holds is read from its tensors (`dora_scale`, `oft_blocks`, `hada_w1`, ...) and its `ss_network_module`:

* plain LoRA (`networks.lora` and the families' own LoRA modules, `lora_fa`, `dylora`; LoCon tensors too) and
  DoRA are rebuilt per layer from the file, at each layer's own rank;
* OFT (`networks.oft` and the families' per-part OFT modules) and `lycoris.kohya` files are rebuilt by the
  trainer's network factory from their metadata (`ss_network_args`, dim, alpha), so per-part rotations, presets
  and block layouts are its own;
* anything else is refused by name.

Only the layers a file names are merged; a merge at multiplier 0 leaves every weight bit for bit as it was.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lorakit.adapters.base import AdapterModule
from lorakit.adapters.algorithms import GENERIC_MODULES
from lorakit.adapters.formats import tensors_by_module
from lorakit.adapters.network import LoRANetwork
from lorakit.adapters.spec import make_target_spec
from lorakit.adapters.targets import AdapterTarget
from lorakit.errors import CheckpointError, ConfigError
from lorakit.families.base import Components, ModelFamily
from lorakit.families.registry import all_families, describe_lora_names, guess_lora_family

log = logging.getLogger("lorakit")
#: tensor names of algorithms only `lycoris.kohya` builds
_LYCORIS_MARKERS = (("hada_w1", "LoHa"), ("lokr_w1", "LoKr"), ("lora_mid", "LoCon with Tucker decomposition"),
                    ("oft_diag", "LyCORIS OFT/BOFT"), ("a1.weight", "GLoRA"), ("on_input", "IA3"), (".diff", "full diff"))


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora path;multiplier` value."""

    path: str
    multiplier: float = 1.0


def parse_lora_spec(text: str, option: str = "--lora") -> LoraSpec:
    """`path;multiplier` (sd-scripts' syntax; `;` because `:` is part of Windows paths), or a bare path (1.0)."""
    path, separator, value = text.rpartition(";")
    if not separator:
        path, value = text, ""
    path = path.strip()
    if not path:
        raise ConfigError([f"{option} {text!r}: no file before ';' (expected path;multiplier)"])
    if not separator:
        return LoraSpec(path)
    try:
        multiplier = float(value)
    except ValueError:
        raise ConfigError([f"{option} {text!r}: the multiplier after ';' must be a number, got {value!r}"]) from None
    if multiplier != multiplier or multiplier in (float("inf"), float("-inf")):
        raise ConfigError([f"{option} {text!r}: the multiplier must be a finite number"])
    return LoraSpec(path, multiplier)


@dataclass
class LoraFile:
    """A LoRA file read and classified, before any model is loaded."""

    spec: LoraSpec
    state: dict[str, torch.Tensor]
    metadata: dict[str, str]
    network_module: str
    algorithm: str  # lora, dora, oft or lycoris


def read_lora_file(spec: LoraSpec, option: str = "--lora") -> LoraFile:
    """Read and classify one file; every refusal names the file (and the key that decided it)."""
    from lorakit.adapters.formats import load_lora_file

    if not Path(spec.path).is_file():
        raise ConfigError([f"{option} {spec.path}: file not found"])
    state, metadata = load_lora_file(spec.path)
    if not state:
        raise CheckpointError(f"{spec.path}: holds no tensors")
    peft = next((k for k in state if ".lora_A." in k or ".lora_B." in k), None)
    if peft is not None:
        raise CheckpointError(
            f"{spec.path}: key {peft} is in the diffusers/PEFT layout; convert it first with "
            "`lorakit lora convert --to kohya`"
        )
    module = metadata.get("ss_network_module")
    if module in (None, "", "None"):  # training without --network_module writes "None"; networks.lora is meant
        module = "networks.lora"
    algorithm = _algorithm(spec.path, state, module)
    return LoraFile(spec, state, metadata, module, algorithm)


def _algorithm(path: str, state: dict[str, torch.Tensor], module: str) -> str:
    if module == "lycoris.kohya":
        return "lycoris"
    for marker, name in _LYCORIS_MARKERS:
        key = next((k for k in state if marker in k), None)
        if key is not None:
            raise CheckpointError(
                f"{path}: key {key} is a {name} tensor, and the file's ss_network_module is {module}, not "
                "lycoris.kohya; lorakit sample merges only what its trainer networks write"
            )
    modules = _per_layer_modules()
    if module not in modules:
        raise CheckpointError(
            f"{path}: ss_network_module {module} is not a network lorakit can load "
            f"(supported: {', '.join(modules)}, lycoris.kohya)"
        )
    if any(".oft_blocks" in k for k in state):  # oft_flux: one `oft_blocks.<i>` per fused part
        return "oft"
    if any(k.endswith(".dora_scale") for k in state):
        return "dora"
    return "lora"


def _per_layer_modules() -> list[str]:
    """The network modules whose files hold one module per layer (every family's own LoRA and OFT modules too)."""
    own = [m for family in all_families() for m in (*family.lora_network_modules, *family.oft_network_modules)]
    return [m for m in (*GENERIC_MODULES, *own) if m != "lycoris.kohya"]


def check_family(lora: LoraFile, family_name: str) -> None:
    """Refuse a file whose metadata names another model family (its keys are checked when it loads)."""
    theirs = guess_lora_family([], lora.metadata)
    if theirs is not None and theirs != family_name:
        version = lora.metadata.get("ss_base_model_version") or lora.metadata.get("modelspec.architecture")
        raise CheckpointError(
            f"{lora.spec.path}: a LoRA for the {theirs} family (metadata: {version}); the model is {family_name}"
        )


# ---------------------------------------------------------------------------------------------------------
# merging
# ---------------------------------------------------------------------------------------------------------


class LoraMerger:
    """Merges files into one loaded model; the family's layers are listed once and shared by every file."""

    def __init__(self, family: ModelFamily, comps: Components):
        self.family, self.comps = family, comps
        self._layers: dict[str, AdapterTarget] | None = None

    @property
    def layers(self) -> dict[str, AdapterTarget]:
        """Every layer the family's trainer networks can adapt, by kohya name (built on first use: FLUX/SD3
        fused views route their parts when they are made, so they are made once)."""
        if self._layers is None:
            # the --network_args that make the family list every layer a file may name; the file's ranks replace theirs
            every_layer = make_target_spec(self.family, args=self.family.all_layers_args)
            self._layers = {t.name: t for t in self.family.adapter_targets(self.comps, every_layer)}
        return self._layers

    def network(self, lora: LoraFile) -> LoRANetwork:
        """The network the file was trained as, over this model's layers, with the file's tensors loaded (not
        attached: each module's `delta_weight`/`merged_weight` give the file's change of its layer)."""
        return self._loaded_network(lora)

    @torch.no_grad()
    def merge(self, lora: LoraFile, network: LoRANetwork | None = None) -> int:
        """Merge one file at its multiplier (into `network`, its `network(lora)` built beforehand, when given);
        returns how many layers changed."""
        network = network or self._loaded_network(lora)
        in_file = {key.partition(".")[0] for key in lora.state}
        merged = 0
        for name, module in network.lora_modules.items():
            if name in in_file:
                # W ← W' at the multiplier; a fused view (FLUX/SD3 q/k/v) hands W' − W to its parts
                module.merge_to_base(lora.spec.multiplier)
                merged += 1
        return merged

    def attach(self, lora: LoraFile) -> LoRANetwork:
        """The file's network attached to the model unmerged, at its multiplier (`set_multiplier` changes it
        between images; `restore` detaches it); only the layers the file names carry a module."""
        network = self._loaded_network(lora)
        in_file = {key.partition(".")[0] for key in lora.state}
        for name, module in network.lora_modules.items():
            if name in in_file:
                module.to(self.comps.denoiser.device)
                module.apply_to()
        network.set_multiplier(lora.spec.multiplier)
        return network

    def _loaded_network(self, lora: LoraFile) -> LoRANetwork:
        network = self._factory_network(lora) if lora.algorithm in ("oft", "lycoris") else self._per_layer_network(lora)
        for warning in network.load_kohya_state_dict(lora.state, source=lora.spec.path, describe=describe_lora_names):
            log.debug(warning)  # a layer the file leaves out is not merged nor attached
        return network

    def _per_layer_network(self, lora: LoraFile) -> LoRANetwork:
        """LoRA and DoRA: one module per file module on the family's layer of that name, at the file's rank."""
        by_module = tensors_by_module(lora.state)
        targets = []
        for name, tensors in by_module.items():
            layer = self.layers.get(name)
            if layer is not None:
                targets.append(AdapterTarget(name, layer.module, layer.component, *_rank_alpha(lora.spec.path, name, tensors)))
        if len(targets) < len(by_module):
            # the strict loader over every layer gives the message: the key, the file, and which family's
            # names the file holds against this model's
            LoRANetwork(list(self.layers.values())).load_kohya_state_dict(lora.state, source=lora.spec.path,
                                                                         describe=describe_lora_names)
        return LoRANetwork(targets, module_factory=_module_factory(lora))

    def _factory_network(self, lora: LoraFile) -> LoRANetwork:
        """OFT and LyCORIS: the trainer's network factory, configured from the file's metadata (OFT: every linear
        and conv the family offers, sized from the file's tensors), so parts, presets and block layouts are its own."""
        from lorakit.adapters.factory import build_network

        meta = lora.metadata
        args = _json_dict(meta.get("ss_network_args"), lora.spec.path)
        dim, alpha = _number(meta.get("ss_network_dim")), _number(meta.get("ss_network_alpha"))
        unet_only = False
        if lora.algorithm == "oft":
            args.update(enable_all_linear="True", enable_conv="True")
            dim, alpha = _oft_size(lora)
            unet_only = True
        spec = make_target_spec(self.family, module=lora.network_module, rank=int(dim) if dim else None, alpha=alpha or None,
                                args=args, train_text_encoder=not unet_only)
        network = build_network(spec, self.family, self.comps, self.comps.denoiser.device)
        network.restore()  # the factory attached it for training; it is merged instead
        return network


def _module_factory(lora: LoraFile) -> Callable[[AdapterTarget], AdapterModule] | None:
    if lora.algorithm == "dora":
        from lorakit.adapters.dora import DoRAModule

        # the file's dora_scale shape decides the axis when it loads
        return lambda t: DoRAModule(t.name, t.module, t.rank, t.alpha)
    return None  # plain LoRA modules


def _oft_size(lora: LoraFile) -> tuple[int, float]:
    """(blocks per layer, constraint alpha) of an OFT file, from its first module's tensors."""
    blocks = next(v for k, v in lora.state.items() if ".oft_blocks" in k)
    alpha = next((float(v) for k, v in lora.state.items() if k.endswith(".alpha")), 0.0)
    return int(blocks.shape[0]), alpha


def _rank_alpha(path: str, name: str, tensors: dict[str, torch.Tensor]) -> tuple[int, float]:
    """The module's rank (rows of lora_down) and alpha (missing or 0: alpha = rank, as every loader reads it)."""
    if "lora_down.weight" not in tensors:
        raise CheckpointError(f"{path}: {name} has no lora_down.weight")
    rank = int(tensors["lora_down.weight"].shape[0])
    alpha = tensors.get("alpha")
    return rank, float(alpha) if alpha is not None and float(alpha) != 0.0 else float(rank)


def _json_dict(text: str | None, path: str) -> dict[str, str]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: metadata ss_network_args is not JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: metadata ss_network_args is not a table: {text!r}")
    return {str(k): str(v) for k, v in value.items()}


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "", "None", "Dynamic") else None
    except ValueError:
        return None
