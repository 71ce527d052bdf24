"""Merging LoRAs: into a base model's weights, or into one LoRA (same rank, concatenated, or SVD to a rank).

Every mode applies each ratio exactly once to ΔW_i = (alpha_i / r_i) · up_i · down_i:

* into a model: W ← W + Σ_i ratio_i · ΔW_i;
* `concat`: the factors are stacked along the rank axis with √|c_i| on each side (the sign on down), so the
  product is exactly Σ_i ratio_i · ΔW_i; the output rank is the sum of the ranks;
* `same` (the default) and `svd`: the exact sum Σ_i ratio_i · ΔW_i is re-factorised by truncated SVD to the
  shared rank (`same`) or to `new_rank` (`svd`).

sd-scripts' plain LoRA+LoRA merge instead sums the scaled factors, which multiplies the ratio in twice
(ratio·|ratio|) and creates cross terms up_i·down_j between models; neither is copied here.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from lorakit.errors import CheckpointError, ConfigError
from lorakit.families.base import Components, ModelFamily
from lorakit.tools.common import LoadedLora
from lorakit.tools.lora_state import LoraFactors
from lorakit.tools.svd import factorise
from lorakit.tools.targets import ToolTarget, model_targets, named_layers

__all__ = ["MERGE_MODES", "check_ratios", "merge_into_model", "merge_loras", "model_index"]

MERGE_MODES = ("same", "concat", "svd")


def check_ratios(models: Sequence[str], ratios: Sequence[float] | None) -> list[float]:
    """One ratio per model (1.0 each when none are given)."""
    if not models:
        raise ConfigError(["--models: give at least one LoRA file"])
    if ratios is None or len(ratios) == 0:
        return [1.0] * len(models)
    if len(ratios) != len(models):
        raise ConfigError([f"--ratios: {len(ratios)} ratio(s) for {len(models)} model(s); give one ratio per file in --models"])
    return [float(r) for r in ratios]


# ---------------------------------------------------------------------------------------------------------
# Into a base model
# ---------------------------------------------------------------------------------------------------------


def _fits(delta_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> bool:
    """Whether ΔW of `delta_shape` can be added to a weight; a 1x1 conv and a linear of the same size are
    interchangeable (SD 2.x proj_in/proj_out are linears in diffusers and 1x1 convs in other tools)."""
    squeeze = lambda shape: shape[:2] if shape[2:] in ((), (1, 1)) else shape  # noqa: E731
    return squeeze(tuple(delta_shape)) == squeeze(tuple(weight_shape))


def _check_against_model(lora: LoadedLora, index: dict[str, ToolTarget]) -> None:
    """Every module of the LoRA exists in the model with a matching shape; checked before any weight changes."""
    for name, module in lora.modules.items():
        target = index.get(name)
        if target is None:
            raise CheckpointError(f"{lora.path}: key {name}.lora_down.weight names a module the base model does not have")
        delta_shape = (module.up.shape[0], *module.down.shape[1:])
        weight_shape = target.shape
        if not _fits(delta_shape, weight_shape):
            raise CheckpointError(
                f"{lora.path}: key {name}.lora_down.weight has shape {tuple(module.down.shape)} (up "
                f"{tuple(module.up.shape)}), which does not fit the base model's weight {weight_shape}"
            )


@contextmanager
def model_index(components: Components, family: ModelFamily) -> Iterator[dict[str, ToolTarget]]:
    """The family's LoRA targets by kohya name; for layouts whose names are plain module paths, also every other
    Linear/Conv2d, which LyCORIS-style presets may name."""
    with model_targets(family, components) as targets:
        index = {name: ToolTarget(name, module, "") for name, module in named_layers(family, components).items()}
        index.update(targets)
        yield index


@torch.no_grad()
def merge_into_model(
    components: Components,
    family: ModelFamily,
    loras: Sequence[LoadedLora],
    ratios: Sequence[float],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> int:
    """Add ratio_i · ΔW_i of every LoRA into the model's weights (in place); returns the modules changed.

    The layers come from the family's own LoRA targets (`tools.targets`), so a fused SD3/FLUX qkv or a
    swapped modulation receives its ΔW rows exactly where a trained network would put them. The sum is formed
    in `dtype` (at least float32) and cast back to each weight's own dtype once. Every LoRA is checked against
    the model first, so a bad file leaves the model untouched.
    """
    with model_index(components, family) as index:
        by_factors = [_by_factors(lora) for lora in loras]
        for lora, plain in zip(loras, by_factors):
            if plain:
                _check_against_model(lora, index)
        networks = _file_networks(components, family, loras, ratios, by_factors)  # every file checked first
        changed = set()
        for lora, ratio, plain in zip(loras, ratios, by_factors):
            if not plain:
                continue
            for name, module in lora.modules.items():
                target = index[name]
                delta = (ratio * module.delta(device=device or target.device)).reshape(target.shape)
                target.add(delta, dtype)
                changed.add(name)
        for merger, lora_file, network in networks:
            merger.merge(lora_file, network)
            changed.update(key.partition(".")[0] for key in lora_file.state)
    return len(changed)


def _by_factors(lora: LoadedLora) -> bool:
    """Whether a file merges as LoRA factors onto the model's named layers (LyCORIS presets' names included);
    others (DoRA, OFT, the other LyCORIS algorithms, norm modules) merge through the network they were trained as."""
    return lora.modules is not None and not any(key.rpartition(".")[2] in ("w_norm", "b_norm") for key in lora.tensors)


def _file_networks(components, family, loras, ratios, by_factors) -> list:
    """(merger, file, loaded network) of each file that merges through its own network (sdxl_merge_lora.py's
    OFT merge: W' = Rᵀ·W per block, at the ratio: R_m = m·(R − I) + I)."""
    from lorakit.sampling.apply_lora import LoraMerger, LoraSpec, read_lora_file

    merger = LoraMerger(family, components)
    found = []
    for lora, ratio, plain in zip(loras, ratios, by_factors):
        if not plain:
            lora_file = read_lora_file(LoraSpec(lora.path, ratio), option="--models")
            found.append((merger, lora_file, merger.network(lora_file)))
    return found


# ---------------------------------------------------------------------------------------------------------
# Into one LoRA
# ---------------------------------------------------------------------------------------------------------


def _contributions(loras: Sequence[LoadedLora], ratios: Sequence[float]) -> dict[str, list[tuple[LoadedLora, LoraFactors, float]]]:
    """For each module name (first-seen order), the (file, module, ratio) triples that contain it."""
    table: dict[str, list[tuple[LoadedLora, LoraFactors, float]]] = {}
    for lora, ratio in zip(loras, ratios):
        for name, module in lora.modules.items():
            table.setdefault(name, []).append((lora, module, ratio))
    return table


def _check_shapes(name: str, parts: list[tuple[LoadedLora, LoraFactors, float]]) -> None:
    """All contributions to a module must adapt a layer of the same shape."""
    first_file, first, _ = parts[0]
    shape = (first.up.shape[0], *first.down.shape[1:])
    for lora, module, _ in parts[1:]:
        other = (module.up.shape[0], *module.down.shape[1:])
        if not _fits(other, shape):
            raise CheckpointError(
                f"{lora.path}: key {name}.lora_down.weight adapts a layer of shape {other}, but {first_file.path} "
                f"adapts one of shape {shape}; these LoRAs are not for the same model"
            )


def _concat(name: str, parts: list[tuple[LoadedLora, LoraFactors, float]], shuffle: bool) -> LoraFactors:
    """Stacked factors whose product is exactly Σ ratio_i · ΔW_i; the first file's scale is kept."""
    base = parts[0][1]
    total_rank = sum(m.rank for _, m, _ in parts)
    out_scale = base.scale
    downs, ups = [], []
    for _, module, ratio in parts:
        weight = ratio * module.scale / out_scale  # c_i relative to the output scale
        root = abs(weight) ** 0.5
        sign = 1.0 if weight >= 0 else -1.0
        # a 1x1 conv pair and a linear pair of the same size stack once both use the first file's layout
        downs.append(module.down.float().reshape(module.rank, *base.down.shape[1:]) * (root * sign))
        ups.append(module.up.float().reshape(base.up.shape[0], module.rank, *base.up.shape[2:]) * root)
    down, up = torch.cat(downs, 0), torch.cat(ups, 1)
    if shuffle:
        # a permutation of the rank axis leaves up·down unchanged (sd-scripts' --shuffle)
        order = torch.tensor(random.sample(range(total_rank), total_rank))
        down, up = down[order], up[:, order]
    return LoraFactors(name, down, up, out_scale * total_rank)


def _refactorise(
    name: str,
    parts: list[tuple[LoadedLora, LoraFactors, float]],
    rank: int,
    alpha: float | None,
    device: str | torch.device | None,
    clamp_quantile: float | None,
) -> LoraFactors:
    """The truncated SVD of Σ ratio_i · ΔW_i at `rank`, stored with `alpha` (None: alpha = rank)."""
    total = None
    for _, module, ratio in parts:
        delta = ratio * module.delta(device=device)
        total = delta if total is None else total + delta.reshape(total.shape)
    result = factorise(total, rank, clamp_quantile=clamp_quantile)
    kept = result.rank
    scale = (alpha / kept) if alpha else 1.0
    # ΔW = scale · up·down, so the singular values move into up divided by the stored scale
    return LoraFactors(name, result.down.cpu(), (result.up / scale).cpu(), alpha if alpha else float(kept))


def merge_loras(
    loras: Sequence[LoadedLora],
    ratios: Sequence[float],
    *,
    mode: str = "same",
    new_rank: int | None = None,
    new_conv_rank: int | None = None,
    shuffle: bool = False,
    clamp_quantile: float | None = None,
    device: str | torch.device | None = None,
) -> dict[str, LoraFactors]:
    """One LoRA from several (see the module docstring for the modes)."""
    if mode not in MERGE_MODES:
        raise ValueError(f"mode must be one of {MERGE_MODES}")
    if mode == "svd" and not new_rank:
        raise ConfigError(["--new_rank: the SVD merge needs the rank of the result"])
    merged: dict[str, LoraFactors] = {}
    for name, parts in _contributions(loras, ratios).items():
        _check_shapes(name, parts)
        if mode == "concat":
            merged[name] = _concat(name, parts, shuffle)
        elif mode == "svd":
            rank = (new_conv_rank or new_rank) if parts[0][1].is_spatial else new_rank
            merged[name] = _refactorise(name, parts, rank, None, device, clamp_quantile)
        else:
            ranks = {m.rank for _, m, _ in parts}
            if len(ranks) != 1:
                files = ", ".join(f"{lora.path} (rank {m.rank})" for lora, m, _ in parts)
                raise CheckpointError(
                    f"key {name}.lora_down.weight has different ranks in {files}; "
                    "use --concat (exact, ranks add up) or --new_rank N (SVD)"
                )
            first = parts[0][1]
            merged[name] = _refactorise(name, parts, first.rank, first.alpha_value, device, None)
    return merged
