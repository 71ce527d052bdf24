"""The models `lorakit bench` measures: tiny test models and real-size shapes with random weights, written once
as the single files users train from (each family's `tiny.py: bench_files`), so model loading is measured from a
real file. Families without benchmark models are named in the error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lorakit.families.registry import family_names, fixtures, get_family

SIZES = ("tiny", "real")


@dataclass
class BenchModel:
    """Where the model's files are and the `lorakit train` options that name them."""

    family: str
    size: str
    model_args: list[str]
    notes: list[str] = field(default_factory=list)

    def train_args(self) -> list[str]:
        # the sd-scripts network module the family trains with
        return [*self.model_args, f"--network_module={get_family(self.family).default_network_module}"]


def bench_families() -> tuple[str, ...]:
    """The families with benchmark models."""
    return tuple(name for name in family_names() if hasattr(fixtures(name), "bench_files"))


def size_aliases() -> dict[str, tuple[str, str]]:
    """Shorthands for a family at a size (`--size sd15`), as the families' fixtures declare them."""
    return {alias: (name, size) for name in bench_families() for alias, size in getattr(fixtures(name), "BENCH_ALIASES", {}).items()}


def bench_model(family: str, size: str, cache: Path, blocks: tuple[int, int] | None = None) -> BenchModel:
    """The model's files under `cache`, written on first use and reused afterwards."""
    if family not in bench_families() or size not in SIZES:
        raise ValueError(f"unknown bench model {family}/{size} (families: {', '.join(bench_families())})")
    args, notes = fixtures(family).bench_files(size, cache / f"{family}_{size}", blocks)
    return BenchModel(family, size, args, notes)
