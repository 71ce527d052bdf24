"""Reading `--network_args` values, which arrive as strings (as in sd-scripts); problems are collected, not raised,
so one run reports every bad value at once."""

from __future__ import annotations

from collections.abc import Mapping


def parse_float(args: Mapping[str, str], key: str, problems: list[str], default: float | None = None) -> float | None:
    if key not in args:
        return default
    try:
        return float(args[key])
    except ValueError:
        problems.append(f"--network_args {key}={args[key]}: must be a number")
        return default


def parse_int(args: Mapping[str, str], key: str, problems: list[str], default: int) -> int:
    if key not in args:
        return default
    try:
        return int(args[key])
    except ValueError:
        problems.append(f"--network_args {key}={args[key]}: must be a whole number")
        return default


def parse_bool(args: Mapping[str, str], key: str, problems: list[str], default: bool = False) -> bool:
    if key not in args:
        return default
    value = str(args[key]).strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", "none", ""):
        return False
    problems.append(f"--network_args {key}={args[key]}: must be True or False")
    return default
