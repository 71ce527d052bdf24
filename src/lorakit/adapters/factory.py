"""`--network_module` -> the adapter network, built over the layers a model family offers.

This is the one place that knows which adapter algorithms exist; training, sampling and the tools only call
`build_network` with a `TargetSpec`. Every algorithm ends up as a `LoRANetwork` of `AdapterModule`s, so saving,
loading, optimizer groups and merging are the same code for all of them.

| --network_module | modules | --network_args read here |
|---|---|---|
| networks.lora (and a family's own LoRA module, e.g. FLUX's) | LoRA / LoCon, or DoRA with `dora_wd=True` | dora_wd, wd_on_output (sizes and dropouts: `spec.py`) |
| networks.lora_fa | LoRA-FA (frozen down) | as networks.lora |
| networks.dylora | DyLoRA | unit, conv_dim (= network_dim), conv_alpha |
| networks.oft (and a family's per-part OFT module) | OFT (U-Net / DiT only) | enable_all_linear, enable_conv |
| lycoris.kohya | LyCORIS algorithms | see `lycoris_bridge.LYCORIS_ARGS` |
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lorakit.adapters.algorithms import DyLoRAOptions, LoRAOptions, OFTOptions, algorithm_of, available_modules
from lorakit.adapters.base import AdapterModule
from lorakit.adapters.network import LoRANetwork
from lorakit.adapters.spec import TargetSpec, with_family_args
from lorakit.adapters.targets import AdapterTarget
from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.families.base import Components, ModelFamily

log = logging.getLogger("lorakit")

# ---------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------


def build_network(spec: TargetSpec, family: "ModelFamily", comps: "Components", device: torch.device | str) -> LoRANetwork:
    """The network the spec describes, attached to the model (its `weights` are loaded by the caller)."""
    builders: dict[str, Callable[..., LoRANetwork]] = {
        "lora": _lora_network, "lora_fa": _lora_fa_network, "dylora": _dylora_network, "oft": _oft_network,
        "lycoris": _lycoris_network,
    }
    algorithm = algorithm_of(spec.module, family)
    if algorithm is None:
        raise ConfigError([f"--network_module {spec.module}: not available (available: {', '.join(available_modules(family))})"])
    network = builders[algorithm](spec, family, comps)
    network.apply_to()
    network.to(device=device, dtype=torch.float32)
    counts = network.num_modules_by_component()
    log.info("%s modules: %s", spec.module, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return network


def _dropouts(spec: TargetSpec) -> dict[str, float | None]:
    return {"dropout": spec.dropout, "rank_dropout": spec.rank_dropout, "module_dropout": spec.module_dropout}


def _plain_network(spec: TargetSpec, family: "ModelFamily", comps: "Components",
                   make: Callable[..., AdapterModule] | None) -> LoRANetwork:
    options = _dropouts(spec)
    factory = None if make is None else (lambda target: make(target, **options))
    return LoRANetwork(lora_targets(spec, family, comps), module_factory=factory, **options)


def _lora_network(spec: TargetSpec, family: "ModelFamily", comps: "Components") -> LoRANetwork:
    options: LoRAOptions = spec.algorithm or LoRAOptions()
    if not options.dora:
        return _plain_network(spec, family, comps, None)
    from lorakit.adapters.dora import DoRAModule

    if spec.dropout:
        log.warning("--network_dropout %s is ignored with dora_wd=True; rank and module dropout still apply", spec.dropout)
    # per input channel by default: the layout ComfyUI, Forge, A1111 and LyCORIS all merge exactly (docs/adapters.md)
    return _plain_network(spec, family, comps, lambda t, **kw: DoRAModule(
        t.name, t.module, t.rank, t.alpha, wd_on_output=options.wd_on_output, **kw))


def _lora_fa_network(spec: TargetSpec, family: "ModelFamily", comps: "Components") -> LoRANetwork:
    from lorakit.adapters.lora_fa import LoRAFAModule

    return _plain_network(spec, family, comps, lambda t, **kw: LoRAFAModule(t.name, t.module, t.rank, t.alpha, **kw))


def _dylora_network(spec: TargetSpec, family: "ModelFamily", comps: "Components") -> LoRANetwork:
    from lorakit.adapters.dylora import DyLoRAModule

    unit = (spec.algorithm or DyLoRAOptions()).unit
    return _plain_network(spec, family, comps, lambda t, **kw: DyLoRAModule(t.name, t.module, t.rank, t.alpha, unit=unit, **kw))


def lora_targets(spec: TargetSpec, family: "ModelFamily", comps: "Components") -> list[AdapterTarget]:
    """The family's layers, with sd-scripts' block-wise ranks (`block_dims`, `*_lr_weight`, …) applied."""
    from lorakit.adapters.blocks import apply_block_ranks, is_blockwise

    if spec.module_sizes is not None:
        return sized_targets(spec, family, comps)
    targets = family.adapter_targets(comps, spec)
    if not is_blockwise(spec.args):
        return targets
    return apply_block_ranks(targets, spec.args, spec.rank, spec.alpha, family.block_layout)


def sized_targets(spec: TargetSpec, family: "ModelFamily", comps: "Components") -> list[AdapterTarget]:
    """--dim_from_weights (sd-scripts' `create_network_from_weights`): the layers the --network_weights file
    names, each with the file's rank and alpha, whatever --network_dim and the size keys of --network_args say.
    Modules of the file the model does not have (or does not train here) are named in a warning."""
    sizes = spec.module_sizes or {}
    every_layer = with_family_args(spec, family, family.all_layers_args)
    found = [AdapterTarget(t.name, t.module, t.component, *sizes[t.name])
             for t in family.adapter_targets(comps, every_layer) if t.name in sizes]
    left = sorted(set(sizes) - {t.name for t in found})
    if left:
        log.warning("--dim_from_weights: %d module(s) of %s are not built (not in this model, or in a part that does "
                    "not train): %s", len(left), spec.weights, ", ".join(left[:5]) + (" ..." if len(left) > 5 else ""))
    return found


# ---------------------------------------------------------------------------------------------------------
# OFT
# ---------------------------------------------------------------------------------------------------------


def oft_targets(targets: list[AdapterTarget], family: "ModelFamily", options: OFTOptions) -> list[AdapterTarget]:
    """The OFT subset of a family's targets, renamed `lora_unet_…` -> `oft_unet_…` (sd-scripts' names)."""
    chosen = []
    for target in targets:
        if target.component != "unet":
            continue
        is_linear = isinstance(target.module, torch.nn.Linear)
        keep = bool(family.oft_attention.search(target.name)) if is_linear else options.enable_conv
        keep = keep or (is_linear and options.enable_all_linear)
        if keep:
            name = "oft_" + target.name.removeprefix("lora_")
            chosen.append(AdapterTarget(name, target.module, target.component, target.rank, target.alpha))
    return chosen


def _oft_network(spec: TargetSpec, family: "ModelFamily", comps: "Components") -> LoRANetwork:
    from lorakit.adapters.oft import RECOMMENDED_CONSTRAINT, OFTModule

    options: OFTOptions = spec.algorithm or OFTOptions()
    if spec.train_text_encoder:
        log.warning("OFT adapts the denoiser only; text encoders are not trained (as with --network_train_unet_only)")
    # conv_dim makes the family list its convolutions; OFT ignores the rank it carries
    query = with_family_args(spec, family, {"conv_dim": "1"} if options.enable_conv else {}, train_unet=True,
                             train_text_encoder=False)
    targets = oft_targets(family.adapter_targets(comps, query), family, options)
    num_blocks = spec.rank
    alpha = spec.alpha_option if spec.alpha_option else 1e-3
    low, high = RECOMMENDED_CONSTRAINT
    if not low <= alpha <= high:
        log.warning(
            "OFT uses --network_alpha %g as its constraint; the recommended range is %g to %g (too large a value "
            "leaves the rotations unconstrained)", alpha, low, high,
        )

    def make(target: AdapterTarget) -> AdapterModule:
        try:
            parts = _oft_parts(target.module) if options.per_part else None
            return OFTModule(target.name, target.module, num_blocks, alpha, parts=parts)
        except ValueError as exc:
            raise ConfigError([f"--network_dim {num_blocks}: {exc}"]) from exc

    return LoRANetwork(targets, module_factory=make)


def _oft_parts(layer: torch.nn.Module) -> list[int]:
    """A per-part OFT's parts of a layer: a fused view's q, k, v (and MLP) row counts, else the whole layer."""
    slices = getattr(layer, "slices", None)
    if slices is None:
        return [layer.weight.shape[0]]
    return [s.stop - s.start for s in slices]


# ---------------------------------------------------------------------------------------------------------
# LyCORIS
# ---------------------------------------------------------------------------------------------------------


def lycoris_roots(family: "ModelFamily", comps: "Components", spec: TargetSpec, walk_denoiser: bool) -> list:
    """The model parts a `lycoris.kohya` network walks, with sd-scripts' prefixes."""
    from lorakit.adapters.lycoris_bridge import LycorisRoot
    from lorakit.adapters.targets import clip_path_prefix

    roots = []
    if spec.train_text_encoder:
        encoders = list(comps.text_encoders)
        for index, encoder in enumerate(encoders):
            prefix = "lora_te" if len(encoders) == 1 else f"lora_te{index + 1}"
            path_prefix = clip_path_prefix(encoder) if type(encoder).__name__.startswith("CLIPText") else ""
            roots.append(LycorisRoot(prefix, encoder, "text_encoder", path_prefix))
    if spec.train_unet and walk_denoiser:
        # a family whose kohya names follow another module layout (e.g. SGM paths) says how to rename
        roots.append(LycorisRoot("lora_unet", comps.denoiser, "unet", is_denoiser=True, rename=family.kohya_module_path(comps)))
    return roots


def lycoris_network_targets(spec: TargetSpec, family: "ModelFamily", comps: "Components") -> list[AdapterTarget]:
    """The layers a `lycoris.kohya` network of this spec adapts, with their ranks."""
    from lorakit.adapters.lycoris_bridge import lycoris_family_targets, lycoris_targets, preset_classes

    options = spec.algorithm
    denoiser: list[AdapterTarget] | None = None
    if spec.train_unet:
        query = with_family_args(spec, family, {}, train_unet=True, train_text_encoder=False)
        denoiser = family.lycoris_denoiser_targets(comps, query, preset_classes(options))
    targets = lycoris_targets(lycoris_roots(family, comps, spec, walk_denoiser=denoiser is None), options)
    if denoiser is not None:
        targets += lycoris_family_targets(denoiser, options)
    return targets


def _lycoris_network(spec: TargetSpec, family: "ModelFamily", comps: "Components") -> LoRANetwork:
    from lorakit.adapters.lycoris_bridge import LycorisAdapter

    options = spec.algorithm
    if options.module_kwargs["weight_decompose"] and options.dropout:
        log.warning("dropout/--network_dropout is ignored with dora_wd=True; rank and module dropout still apply")
    targets = lycoris_network_targets(spec, family, comps)
    if not targets:
        raise ConfigError([f"--network_args preset={options.preset}: selects no layer of this model"])

    def make(target: AdapterTarget) -> AdapterModule:
        try:
            return LycorisAdapter(target, options)
        except ValueError as exc:  # e.g. BOFT: the layer's width has no factorisation for this --network_dim
            raise ConfigError([
                f"--network_args algo={options.algo} (--network_dim {options.dim}): cannot adapt {target.name}: {exc}"
            ]) from exc

    return LoRANetwork(targets, module_factory=make)
