"""`--network_module` -> the adapter network, built over the layers a model family offers.

This is the one place that knows which adapter algorithms exist; the training loop only calls
`build_network`. Every algorithm ends up as a `LoRANetwork` of `AdapterModule`s, so saving, loading, optimizer
groups and merging are the same code for all of them.

| --network_module | modules | --network_args read here |
|---|---|---|
| networks.lora, networks.lora_sd3, networks.lora_flux | LoRA / LoCon, or DoRA with `dora_wd=True` | conv_dim, conv_alpha (family), rank_dropout, module_dropout, dora_wd, wd_on_output |
| networks.lora_fa | LoRA-FA (frozen down) | as networks.lora |
| networks.dylora | DyLoRA | unit, conv_dim (= network_dim), conv_alpha |
| networks.oft, networks.oft_flux | OFT (U-Net / DiT only) | enable_all_linear, enable_conv |
| lycoris.kohya | LyCORIS algorithms | see `lycoris_bridge.LYCORIS_ARGS` |
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import torch

from lorakit.adapters.base import AdapterModule
from lorakit.adapters.network import LoRANetwork
from lorakit.errors import ConfigError
from lorakit.families.base import AdapterTarget, Components

log = logging.getLogger("lorakit")

KOHYA_LORA_MODULES = ("networks.lora", "networks.lora_sd3", "networks.lora_flux")
OFT_MODULES = ("networks.oft", "networks.oft_flux")
NETWORK_MODULES = (*KOHYA_LORA_MODULES, "networks.lora_fa", "networks.dylora", *OFT_MODULES, "lycoris.kohya")

#: --network_args keys each module reads (beyond the family's conv_dim/conv_alpha and the LoRA+ ratios)
NETWORK_ARGS = {
    "networks.lora": ("conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "dora_wd", "wd_on_output"),
    "networks.lora_fa": ("conv_dim", "conv_alpha", "rank_dropout", "module_dropout"),
    "networks.dylora": ("unit", "conv_dim", "conv_alpha"),
    "networks.oft": ("enable_all_linear", "enable_conv"),
}

# OFT's default targets: the attention projections (diffusers SD names; BFL FLUX names)
_OFT_ATTENTION = re.compile(r"(_attn\d_(to_q|to_k|to_v|to_out_0)|_attn_(qkv|proj))$")


def build_network(cfg: Any, family: Any, comps: Components, device: torch.device) -> LoRANetwork:
    """The network named by --network_module, attached to the model, with --network_weights loaded."""
    module = cfg.network_module or "networks.lora"
    builders: dict[str, Callable[..., LoRANetwork]] = {
        **{name: _lora_network for name in KOHYA_LORA_MODULES},
        "networks.lora_fa": _lora_fa_network,
        "networks.dylora": _dylora_network,
        **{name: _oft_network for name in OFT_MODULES},
        "lycoris.kohya": _lycoris_network,
    }
    if module not in builders:
        raise ConfigError([f"--network_module {module}: not available (available: {', '.join(NETWORK_MODULES)})"])
    kwargs = cfg.network_kwargs() if cfg.network_args else {}
    network = builders[module](cfg, family, comps, kwargs)
    network.apply_to()
    if cfg.network_weights:
        from lorakit.adapters.formats import load_lora_file

        state, _ = load_lora_file(cfg.network_weights)
        for problem in network.load_kohya_state_dict(state, source=cfg.network_weights):
            log.warning(problem)
    network.to(device=device, dtype=torch.float32)
    counts = network.num_modules_by_component()
    log.info("%s modules: %s", module, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return network


# ---------------------------------------------------------------------- LoRA family


def _lora_network(cfg: Any, family: Any, comps: Components, kwargs: dict[str, str]) -> LoRANetwork:
    if not _bool(kwargs, "dora_wd"):
        return _plain_network(cfg, family, comps, kwargs, None, DORA_ARGS)
    from lorakit.adapters.dora import DoRAModule

    if cfg.network_dropout:
        log.warning("--network_dropout %s is ignored with dora_wd=True; rank and module dropout still apply", cfg.network_dropout)
    # per input channel by default: the layout ComfyUI, Forge, A1111 and LyCORIS all merge exactly (docs/adapters.md)
    on_output = _bool(kwargs, "wd_on_output", False)
    return _plain_network(cfg, family, comps, kwargs, lambda t, **kw: DoRAModule(t.name, t.module, t.rank, t.alpha, wd_on_output=on_output, **kw),
                          DORA_ARGS)


def _lora_fa_network(cfg: Any, family: Any, comps: Components, kwargs: dict[str, str]) -> LoRANetwork:
    from lorakit.adapters.lora_fa import LoRAFAModule

    return _plain_network(cfg, family, comps, kwargs, lambda t, **kw: LoRAFAModule(t.name, t.module, t.rank, t.alpha, **kw))


def _dylora_network(cfg: Any, family: Any, comps: Components, kwargs: dict[str, str]) -> LoRANetwork:
    from lorakit.adapters.dylora import DyLoRAModule

    unit = _int(kwargs, "unit", 1)
    rank = cfg.network_dim or 4
    if "conv_dim" in kwargs and _int(kwargs, "conv_dim", rank) != rank:
        raise ConfigError([f"--network_args conv_dim={kwargs['conv_dim']}: DyLoRA needs conv_dim equal to --network_dim ({rank})"])
    if rank % unit:
        raise ConfigError([f"--network_args unit={unit}: --network_dim {rank} must be a multiple of it"])
    if str(kwargs.get("split_qkv", "")) == "True":
        # a split LoRA is one rank-3r module with a block-diagonal up matrix; DyLoRA's truncation to the first
        # b components would train q's block only
        raise ConfigError(["--network_args split_qkv=True: not available with networks.dylora (its rank truncation "
                           "does not apply to the per-part LoRAs of a split layer)"])
    return _plain_network(cfg, family, comps, kwargs, lambda t, **kw: DyLoRAModule(t.name, t.module, t.rank, t.alpha, unit=unit, **kw),
                          DYLORA_ARGS)


def _plain_network(cfg: Any, family: Any, comps: Components, kwargs: dict[str, str], make: Callable[..., AdapterModule] | None,
                   own_args: tuple[str, ...] = ()) -> LoRANetwork:
    options = {
        "dropout": cfg.network_dropout,
        "rank_dropout": _float(kwargs, "rank_dropout"),
        "module_dropout": _float(kwargs, "module_dropout"),
    }
    factory = None if make is None else (lambda target: make(target, **options))
    return LoRANetwork(lora_targets(cfg, family, comps, kwargs, own_args), module_factory=factory, **options)


#: --network_args an algorithm reads itself; the family's target selection does not see them (FLUX and SD3
#: check their network_args against sd-scripts' lora_flux/lora_sd3 keys, which have no DoRA or DyLoRA)
DORA_ARGS = ("dora_wd", "wd_on_output")
DYLORA_ARGS = ("unit",)


def family_network_kwargs(cfg: Any) -> dict[str, str]:
    """The --network_args a model family should read and check for this run's --network_module.

    A family checks its network_args against sd-scripts' LoRA module for it (FLUX: `networks.lora_flux`), which
    knows neither DoRA's and DyLoRA's keys nor OFT's and LyCORIS' (those modules choose their layers and check
    their keys here): the algorithm's own keys are left out, and OFT and LyCORIS leave the family none.
    """
    kwargs = cfg.network_kwargs() if getattr(cfg, "network_args", None) else {}
    module = getattr(cfg, "network_module", None) or "networks.lora"
    if module in OFT_MODULES or module == "lycoris.kohya":
        return {}
    own = DORA_ARGS if module in KOHYA_LORA_MODULES else DYLORA_ARGS if module == "networks.dylora" else ()
    return {k: v for k, v in kwargs.items() if k not in own}


def lora_targets(cfg: Any, family: Any, comps: Components, kwargs: dict[str, str], own_args: tuple[str, ...] = ()) -> list:
    """The family's layers, with sd-scripts' block-wise ranks (`block_dims`, `*_lr_weight`, …) applied;
    `own_args` are the algorithm's own keys, kept from the family."""
    from lorakit.adapters.blocks import apply_block_ranks, is_blockwise

    if any(key in kwargs for key in own_args):
        cfg = _TargetQuery(cfg, {k: v for k, v in kwargs.items() if k not in own_args})
    targets = family.adapter_targets(comps, cfg)
    if not is_blockwise(kwargs):
        return targets
    alpha = cfg.network_alpha if cfg.network_alpha else float(cfg.network_dim or 4)
    return apply_block_ranks(targets, kwargs, cfg.network_dim or 4, alpha)


# ---------------------------------------------------------------------- OFT


class _TargetQuery:
    """The run's options with a few network settings replaced, for asking the family for other targets."""

    def __init__(self, cfg: Any, kwargs: dict[str, str], **overrides: Any):
        self._cfg, self._kwargs, self._overrides = cfg, kwargs, overrides

    def __getattr__(self, name: str) -> Any:
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._cfg, name)

    def network_kwargs(self) -> dict[str, str]:
        return dict(self._kwargs)


def oft_targets(targets: list[AdapterTarget], *, enable_all_linear: bool, enable_conv: bool) -> list[AdapterTarget]:
    """The OFT subset of a family's targets, renamed `lora_unet_…` -> `oft_unet_…` (sd-scripts' names)."""
    chosen = []
    for target in targets:
        if target.component != "unet":
            continue
        is_linear = isinstance(target.module, torch.nn.Linear)
        keep = bool(_OFT_ATTENTION.search(target.name)) if is_linear else enable_conv
        keep = keep or (is_linear and enable_all_linear)
        if keep:
            name = "oft_" + target.name.removeprefix("lora_")
            chosen.append(AdapterTarget(name, target.module, target.component, target.rank, target.alpha))
    return chosen


def _oft_network(cfg: Any, family: Any, comps: Components, kwargs: dict[str, str]) -> LoRANetwork:
    from lorakit.adapters.oft import RECOMMENDED_CONSTRAINT, OFTModule

    enable_all_linear, enable_conv = _bool(kwargs, "enable_all_linear"), _bool(kwargs, "enable_conv")
    if not cfg.network_train_unet_only:
        log.warning("OFT adapts the denoiser only; text encoders are not trained (as with --network_train_unet_only)")
    # conv_dim makes the family list its convolutions; OFT ignores the rank it carries
    query = _TargetQuery(
        cfg, {"conv_dim": "1"} if enable_conv else {}, network_train_unet_only=True, network_train_text_encoder_only=False
    )
    targets = oft_targets(family.adapter_targets(comps, query), enable_all_linear=enable_all_linear, enable_conv=enable_conv)
    num_blocks = cfg.network_dim or 4
    alpha = cfg.network_alpha if cfg.network_alpha else 1e-3
    low, high = RECOMMENDED_CONSTRAINT
    if not low <= alpha <= high:
        log.warning(
            "OFT uses --network_alpha %g as its constraint; the recommended range is %g to %g (too large a value "
            "leaves the rotations unconstrained)", alpha, low, high,
        )

    split = cfg.network_module == "networks.oft_flux"

    def make(target: AdapterTarget) -> AdapterModule:
        try:
            return OFTModule(target.name, target.module, num_blocks, alpha, parts=_oft_parts(target.module) if split else None)
        except ValueError as exc:
            raise ConfigError([f"--network_dim {num_blocks}: {exc}"]) from exc

    return LoRANetwork(targets, module_factory=make)


def _oft_parts(layer: torch.nn.Module) -> list[int]:
    """`networks.oft_flux`'s parts of a layer: a fused view's q, k, v (and MLP) row counts, else the whole layer."""
    slices = getattr(layer, "slices", None)
    if slices is None:
        return [layer.weight.shape[0]]
    return [s.stop - s.start for s in slices]


# ---------------------------------------------------------------------- LyCORIS


#: families whose denoiser layers come from the family's own target list (BFL names over fused views)
#: rather than from LyCORIS' walk over the diffusers model
FAMILY_TARGET_DENOISERS = ("flux",)


def lycoris_roots(family: Any, comps: Components, cfg: Any) -> list:
    """The model parts a `lycoris.kohya` network walks, with sd-scripts' prefixes."""
    from lorakit.adapters.lycoris_bridge import LycorisRoot

    roots = []
    if not cfg.network_train_unet_only:
        encoders = list(comps.text_encoders)
        for index, encoder in enumerate(encoders):
            prefix = "lora_te" if len(encoders) == 1 else f"lora_te{index + 1}"
            # transformers 5 dropped the `text_model.` level from CLIP text models; kohya names keep it
            path_prefix = "text_model." if type(encoder).__name__.startswith("CLIPText") and not hasattr(encoder, "text_model") else ""
            roots.append(LycorisRoot(prefix, encoder, "text_encoder", path_prefix))
    if not cfg.network_train_text_encoder_only and getattr(family, "name", None) not in FAMILY_TARGET_DENOISERS:
        # a family whose kohya names follow another module layout (SDXL: SGM paths) says how to rename
        rename = family.kohya_module_path(comps) if hasattr(family, "kohya_module_path") else None
        roots.append(LycorisRoot("lora_unet", comps.denoiser, "unet", is_denoiser=True, rename=rename))
    return roots


def _lycoris_network(cfg: Any, family: Any, comps: Components, kwargs: dict[str, str]) -> LoRANetwork:
    from lorakit.adapters.lycoris_bridge import (
        LycorisAdapter, LycorisOptions, block_layout, lycoris_family_targets, lycoris_targets,
    )

    family_name = getattr(family, "name", None)
    blocks, layout = block_layout(family_name, kwargs)
    options = LycorisOptions.parse(kwargs, cfg.network_dim, cfg.network_alpha, cfg.network_dropout, blocks, layout)
    if options.module_kwargs["weight_decompose"] and options.dropout:
        log.warning("dropout/--network_dropout is ignored with dora_wd=True; rank and module dropout still apply")
    targets = lycoris_targets(lycoris_roots(family, comps, cfg), options)
    if family_name in FAMILY_TARGET_DENOISERS and not cfg.network_train_text_encoder_only:
        query = _TargetQuery(cfg, {}, network_train_unet_only=True, network_train_text_encoder_only=False)
        denoiser = [t for t in family.adapter_targets(comps, query) if t.component == "unet"]
        targets += lycoris_family_targets(denoiser, options)
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


# ---------------------------------------------------------------------- parsing


def _float(kwargs: dict[str, str], key: str) -> float | None:
    if key not in kwargs:
        return None
    try:
        return float(kwargs[key])
    except ValueError as exc:
        raise ConfigError([f"--network_args {key}={kwargs[key]}: must be a number"]) from exc


def _int(kwargs: dict[str, str], key: str, default: int) -> int:
    if key not in kwargs:
        return default
    try:
        return int(kwargs[key])
    except ValueError as exc:
        raise ConfigError([f"--network_args {key}={kwargs[key]}: must be a whole number"]) from exc


def _bool(kwargs: dict[str, str], key: str, default: bool = False) -> bool:
    if key not in kwargs:
        return default
    value = str(kwargs[key]).strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", "none", ""):
        return False
    raise ConfigError([f"--network_args {key}={kwargs[key]}: must be True or False"])
