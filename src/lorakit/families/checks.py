"""The model family's part of the checks made before anything large loads: its own option rules and the adapter
network it is asked to train (`TargetSpec`), every problem collected."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import ConfigError
from lorakit.families.base import ModelFamily


@dataclass
class FamilyChecks:
    """What the family said about a run's options; `spec` is None when the network options have problems."""

    spec: Any = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_family_options(cfg: Any, family: ModelFamily, *, network: bool = True,
                         spec_of: Callable[[Any, ModelFamily], Any] | None = None) -> FamilyChecks:
    """The family's rules and (with `network`) the spec of what the run trains on it (`spec_of`: the training
    type's; by default the adapter network of `cfg`), with every problem found."""
    from lorakit.adapters.spec import target_spec_from_config

    checks = FamilyChecks()
    if network:
        try:
            checks.spec = (spec_of or target_spec_from_config)(cfg, family)
        except ConfigError as error:
            checks.problems += error.problems
    checks.problems += family.option_problems(cfg, checks.spec)
    checks.warnings += family.option_warnings(cfg)
    return checks
