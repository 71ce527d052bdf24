"""Which adapter algorithm a `--network_module` names, and the algorithm's own `--network_args`, parsed.

| algorithm | modules | its own --network_args |
|---|---|---|
| lora | networks.lora and a family's own LoRA module | dora_wd, wd_on_output |
| lora_fa | networks.lora_fa | none |
| dylora | networks.dylora | unit (and conv_dim = network_dim) |
| oft | networks.oft and a family's per-part OFT module | enable_all_linear, enable_conv |
| lycoris | lycoris.kohya | see `lycoris_bridge.LYCORIS_ARGS` |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorakit.adapters.args import parse_bool, parse_int
from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.adapters.spec import TargetSpec
    from lorakit.families.base import ModelFamily

GENERIC_MODULES = {
    "networks.lora": "lora", "networks.lora_fa": "lora_fa", "networks.dylora": "dylora", "networks.oft": "oft",
    "lycoris.kohya": "lycoris",
}

#: --network_args an algorithm reads itself; the family's target selection does not see them (families check
#: their keys against sd-scripts' LoRA module for them, which has no DoRA or DyLoRA)
DORA_ARGS = ("dora_wd", "wd_on_output")
DYLORA_ARGS = ("unit",)


@dataclass(frozen=True)
class LoRAOptions:
    dora: bool = False  # dora_wd=True: DoRA modules
    wd_on_output: bool = False  # DoRA's magnitude per output row (default: per input column)


@dataclass(frozen=True)
class DyLoRAOptions:
    unit: int = 1


@dataclass(frozen=True)
class OFTOptions:
    enable_all_linear: bool = False
    enable_conv: bool = False
    per_part: bool = False  # one rotation per part of a fused layer (sd-scripts' networks.oft_flux)


def algorithm_of(module: str, family: "ModelFamily") -> str | None:
    """The algorithm a --network_module names for this family (None: not available)."""
    if module in GENERIC_MODULES:
        return GENERIC_MODULES[module]
    if module in family.lora_network_modules:
        return "lora"
    if module in family.oft_network_modules:
        return "oft"
    return None


def available_modules(family: "ModelFamily") -> list[str]:
    return [*GENERIC_MODULES, *family.lora_network_modules, *family.oft_network_modules]


def parse_algorithm_args(spec: TargetSpec, family: "ModelFamily", problems: list[str]) -> Any:
    """The algorithm's own options from --network_args (problems appended, not raised)."""
    algorithm = algorithm_of(spec.module, family)
    args = spec.args
    if algorithm is None:
        problems.append(f"--network_module {spec.module}: not available for {family.title} models "
                        f"(available: {', '.join(available_modules(family))})")
        return None
    if algorithm == "lora":
        return LoRAOptions(parse_bool(args, "dora_wd", problems), parse_bool(args, "wd_on_output", problems))
    if algorithm == "dylora":
        return _dylora_options(spec, problems)
    if algorithm == "oft":
        return OFTOptions(parse_bool(args, "enable_all_linear", problems), parse_bool(args, "enable_conv", problems),
                          per_part=spec.module in family.oft_network_modules)
    if algorithm == "lycoris":
        from lorakit.adapters.lycoris_bridge import LycorisOptions, block_layout

        try:
            layout = block_layout(family.block_layout, args)
            return LycorisOptions.parse(args, spec.rank, spec.alpha_option, spec.dropout, layout)
        except ConfigError as error:
            problems += error.problems
            return None
    return None  # networks.lora_fa has no options of its own


def _dylora_options(spec: TargetSpec, problems: list[str]) -> DyLoRAOptions:
    args = spec.args
    unit = parse_int(args, "unit", problems, 1)
    if "conv_dim" in args and parse_int(args, "conv_dim", problems, spec.rank) != spec.rank:
        problems.append(f"--network_args conv_dim={args['conv_dim']}: DyLoRA needs conv_dim equal to --network_dim ({spec.rank})")
    if unit < 1 or spec.rank % unit:
        problems.append(f"--network_args unit={unit}: --network_dim {spec.rank} must be a multiple of it")
    if str(args.get("split_qkv", "")) == "True":
        # a split LoRA is one rank-3r module with a block-diagonal up matrix; DyLoRA's truncation to the first
        # b components would train q's block only
        problems.append("--network_args split_qkv=True: not available with networks.dylora (its rank truncation "
                        "does not apply to the per-part LoRAs of a split layer)")
    return DyLoRAOptions(unit)


def reads_family_args(module: str, family: "ModelFamily") -> bool:
    """Whether the family's own --network_args keys apply with this module (they do with its LoRA variants)."""
    return algorithm_of(module, family) in ("lora", "lora_fa", "dylora")


def algorithm_family_args(spec: TargetSpec, family: "ModelFamily") -> dict[str, str]:
    """The --network_args the model family reads and checks for this algorithm.

    A family checks its keys against sd-scripts' LoRA module for it, which knows neither DoRA's and DyLoRA's
    keys nor OFT's and LyCORIS' (those choose their layers and check their keys here): the algorithm's own keys
    are left out, and OFT and LyCORIS leave the family none.
    """
    algorithm = algorithm_of(spec.module, family)
    if algorithm in (None, "oft", "lycoris"):
        return {}
    own = DORA_ARGS if algorithm == "lora" else DYLORA_ARGS if algorithm == "dylora" else ()
    return {k: v for k, v in spec.args.items() if k not in own}
