"""`TargetSpec`: the adapter network a run asks for, parsed and checked once, before any model loads.

sd-scripts hands `--network_args` to each network module as strings and every module reads what it wants. Here
they are read once into typed values: the sizes (`--network_dim`/`--network_alpha`, `conv_dim`/`conv_alpha`),
which components train, the dropouts, the adapter algorithm's own options (`factory.parse_algorithm_args`) and
the model family's own keys (`ModelFamily.parse_network_args`, e.g. FLUX's per-type ranks). Every problem is
collected into one `ConfigError`. Families, the network factory and the tools then read the spec, never the
option strings or the whole configuration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorakit.adapters.algorithms import algorithm_family_args, parse_algorithm_args
from lorakit.adapters.args import parse_float
from lorakit.adapters.targets import RankChoice
from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.families.base import ModelFamily

__all__ = ["TargetSpec", "make_target_spec", "target_spec_from_config", "with_family_args"]

DEFAULT_MODULE = "networks.lora"


@dataclass(frozen=True)
class TargetSpec:
    """The adapter network of a run: sizes, components, options of the algorithm and of the family."""

    module: str = DEFAULT_MODULE  # the network module, as the family reads `--network_module` (`network_module`)
    rank: int = 4  # --network_dim (4 when not given, as sd-scripts' create_network)
    alpha_option: float | None = None  # --network_alpha as given (0 or None: each algorithm's default)
    dropout: float | None = None  # --network_dropout
    rank_dropout: float | None = None
    module_dropout: float | None = None
    conv_rank: int | None = None  # conv_dim: LoRA-C3Lier on 3x3 convolutions
    conv_alpha: float | None = None
    train_unet: bool = True
    train_text_encoder: bool = True
    args: Mapping[str, str] = field(default_factory=dict)  # every --network_args value, as given
    algorithm: Any = None  # the algorithm's own parsed options (see factory.parse_algorithm_args)
    family_args: Any = None  # the family's own parsed keys (ModelFamily.parse_network_args)
    weights: str | None = None  # --network_weights
    # --dim_from_weights: kohya name -> (rank, alpha) of every module of --network_weights; only these are built
    module_sizes: Mapping[str, tuple[int, float]] | None = None

    @property
    def alpha(self) -> float:
        """LoRA's alpha: --network_alpha, or the rank when it is 0/None (scale 1)."""
        return self.alpha_option if self.alpha_option else float(self.rank)

    @property
    def ranks(self) -> RankChoice:
        """Rank and alpha of linears and 1x1 convs, and (with conv_dim) of 3x3 convolutions."""
        return RankChoice(self.rank, self.alpha, self.conv_rank, self.conv_alpha)

    @property
    def verbose(self) -> bool:
        """`verbose=True`: list every module with its rank and alpha (only the literal True counts)."""
        return self.args.get("verbose") == "True"

    def replace(self, **changes: Any) -> "TargetSpec":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------


def target_spec_from_config(cfg: Any, family: "ModelFamily") -> TargetSpec:
    """The spec of a training run's `--network_*` options for `family`; every problem at once."""
    args = cfg.network_kwargs() if cfg.network_args else {}
    return make_target_spec(
        family, module=cfg.network_module, rank=cfg.network_dim, alpha=cfg.network_alpha, dropout=cfg.network_dropout,
        args=args, train_unet=not cfg.network_train_text_encoder_only,
        train_text_encoder=not cfg.network_train_unet_only, weights=cfg.network_weights,
    )


def make_target_spec(family: "ModelFamily", *, module: str | None = None, rank: int | None = None,
                     alpha: float | None = None, dropout: float | None = None, args: Mapping[str, str] | None = None,
                     train_unet: bool = True, train_text_encoder: bool = True, weights: str | None = None) -> TargetSpec:
    """A checked spec: the generic sizes, then the algorithm's and the family's own --network_args."""
    args = dict(args or {})
    problems: list[str] = []
    base = TargetSpec(
        module=family.network_module(module), rank=int(rank or 4), alpha_option=alpha, dropout=dropout,
        rank_dropout=parse_float(args, "rank_dropout", problems), module_dropout=parse_float(args, "module_dropout", problems),
        train_unet=train_unet, train_text_encoder=train_text_encoder, args=args, weights=weights,
    )
    base = base.replace(**_conv_ranks(args, problems))
    algorithm = parse_algorithm_args(base, family, problems)
    family_args, family_problems = family.parse_network_args(algorithm_family_args(base, family), base)
    problems += family_problems
    if problems:
        raise ConfigError(problems)
    return base.replace(algorithm=algorithm, family_args=family_args)


def with_family_args(spec: TargetSpec, family: "ModelFamily", args: Mapping[str, str], **changes: Any) -> TargetSpec:
    """The spec with other family keys (and other settings), for asking a family for another set of layers."""
    changed = spec.replace(**changes)
    problems: list[str] = []
    changed = changed.replace(**_conv_ranks(args, problems))
    family_args, family_problems = family.parse_network_args(dict(args), changed)
    problems += family_problems
    if problems:
        raise ConfigError(problems)
    return changed.replace(family_args=family_args)


def _conv_ranks(args: Mapping[str, str], problems: list[str]) -> dict[str, Any]:
    """conv_dim / conv_alpha (sd-scripts' LoRA-C3Lier), when given; conv_alpha defaults to 1. The messages are
    the option checks' own, so a run that reports both says each mistake once."""
    if "conv_dim" not in args:
        return {"conv_rank": None, "conv_alpha": None}
    found = len(problems)
    rank = _number_arg(args, "conv_dim", int, problems)
    alpha = _number_arg(args, "conv_alpha", float, problems) if "conv_alpha" in args else 1.0
    if len(problems) > found:
        return {"conv_rank": None, "conv_alpha": None}
    return {"conv_rank": rank, "conv_alpha": alpha}


def _number_arg(args: Mapping[str, str], key: str, kind: type, problems: list[str]) -> Any:
    try:
        return kind(args[key])
    except ValueError:
        problems.append(f"--network_args: {key} must be {'an integer' if kind is int else 'a number'} (got {args[key]!r})")
        return None
