"""Any adapter file lorakit writes, as the tools need it: ΔW per module, and the base weight of each module.

The rank tools (resize, score recipes) work on low-rank factors (`LoraFactors`). A plain LoRA/LoCon file holds
them; its module names are taken as they are, as sd-scripts' `resize_lora.py` does (a LyCORIS `preset=full` file
names layers, such as SDXL's `input_blocks_0_0`, that `networks.lora` never trains). Other algorithms (DoRA, OFT,
LoHa, LoKr, (IA)³, GLoRA, Tucker LoCon) change their layer by a ΔW that only the algorithm's own math gives, and
for some of them it depends on the layer's weight W: with the base model, the file is loaded into the very
network it was trained as (`sampling.apply_lora.LoraMerger`: the trainer's modules over the model's layers) and
each module's `delta_weight()` is taken, in the layer's shape, then written as exact factors of full rank (the
SVD that follows truncates them). LyCORIS norm modules (`w_norm`, `b_norm`: a change of a norm's weight and bias,
not a matrix) have no rank and are passed through as they are.

The base weights (for the `*_ckpt` and `subspace` recipe scores) come from the family's LoRA targets, every
Linear/Conv of plain-path layouts, and the layers of the file's own network (LyCORIS presets, OFT parts).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from lorakit.adapters.base import base_weight
from lorakit.errors import ConfigError
from lorakit.families.base import Components, ModelFamily
from lorakit.tools.lora_state import ALGORITHM_MARKERS, LoraFactors
from lorakit.tools.targets import forwards_restored

__all__ = ["FileModules", "NORM_SUFFIXES", "file_modules", "factors_of_delta", "needs_model"]

#: tensors of LyCORIS norm modules (a change of a norm layer's weight and bias)
NORM_SUFFIXES = ("w_norm", "b_norm")


@dataclass
class FileModules:
    """The file's modules as factors, the tensors passed through unchanged, and each module's base weight."""

    modules: dict[str, LoraFactors]
    passthrough: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


def needs_model(keys: list[str]) -> str | None:
    """The algorithm whose ΔW needs the base model (its tensors are not LoRA factors), or None."""
    for marker, algorithm in ALGORITHM_MARKERS:
        if algorithm != "norm" and any(marker in key for key in keys):
            return algorithm
    return None


def factors_of_delta(name: str, delta: torch.Tensor) -> LoraFactors:
    """Exact factors of ΔW (out, in[, kh, kw]) at full rank, scale 1: the smaller side is an identity."""
    delta = delta.float()
    out_dim, inner = delta.shape[0], delta[0].numel()
    if out_dim <= inner:
        up = torch.eye(out_dim).reshape(out_dim, out_dim, *([1] * (delta.dim() - 2)))
        return LoraFactors(name, delta, up, float(out_dim))
    down = torch.eye(inner).reshape(inner, *delta.shape[1:])
    up = delta.reshape(out_dim, inner, *([1] * (delta.dim() - 2)))
    return LoraFactors(name, down, up, float(inner))


@contextmanager
def file_network(path: str, family: ModelFamily, components: Components) -> Iterator[dict]:
    """The file's modules, loaded into the network it was trained as over the model's layers, by name."""
    from lorakit.sampling.apply_lora import LoraMerger, LoraSpec, read_lora_file

    lora = read_lora_file(LoraSpec(path, 1.0), option="--model")
    encoders = [e for e in components.text_encoders if e is not None]
    with forwards_restored([components.denoiser, *encoders]):
        network = LoraMerger(family, components).network(lora)
        in_file = {key.partition(".")[0] for key in lora.state}
        yield {name: module for name, module in network.lora_modules.items() if name in in_file}


@torch.no_grad()
def file_modules(path: str, family: ModelFamily, tensors: Mapping[str, torch.Tensor], plain: dict[str, LoraFactors] | None,
                 components: Components | None) -> FileModules:
    """The modules of the file at `path` (its `tensors`), as factors. `plain` are its modules when it holds only
    LoRA factors (None otherwise); `components` is the base model (None: without one, only plain files)."""
    passthrough = {k: v for k, v in tensors.items() if k.rpartition(".")[2] in NORM_SUFFIXES}
    if components is None:
        if plain is None:
            algorithm = needs_model(list(tensors)) or "adapter"
            raise ConfigError([f"--model {path}: its {algorithm} modules change their layers by a ΔW that depends on the "
                               "base model's weights; give --base_model (the model the LoRA applies to)"])
        return FileModules(plain, passthrough)
    result = FileModules(dict(plain or {}), passthrough, _target_weights(family, components))
    if plain is not None:
        return result
    norms = {key.rpartition(".")[0] for key in passthrough}
    with file_network(path, family, components) as modules:
        for name, module in modules.items():
            result.weights[name] = base_weight(module.org_module).detach().float()
            if name not in norms:
                result.modules[name] = factors_of_delta(name, module.delta_weight())
    return result


def _target_weights(family: ModelFamily, components: Components) -> dict[str, torch.Tensor]:
    """Base weights of the family's LoRA targets and, for plain-path layouts, of every Linear/Conv2d."""
    from lorakit.tools.merge import model_index

    with model_index(components, family) as index:
        return _WeightIndex(index)


class _WeightIndex(dict):
    """Base weights read on access (a fused view builds its weight anew on each read)."""

    def __init__(self, index):
        super().__init__()
        self._index = dict(index)

    def __contains__(self, name) -> bool:
        return dict.__contains__(self, name) or name in self._index

    def get(self, name, default=None):
        if dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        target = self._index.get(name)
        return default if target is None else base_weight_of_target(target)

    def __getitem__(self, name):
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value


def base_weight_of_target(target) -> torch.Tensor:
    weight = target.weight()
    return weight.float() if weight.is_floating_point() and weight.element_size() == 1 else weight
