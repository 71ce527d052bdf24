"""Parsing `--network_args` values, which arrive as strings (as in sd-scripts), for the transformer families.

Each parser appends a message to `problems` instead of raising, so one run reports every bad value at once.
"""

from __future__ import annotations

import re


def parse_int(key: str, value: str, problems: list[str]) -> int:
    """A non-negative whole number (0 on error)."""
    try:
        number = int(value)
    except ValueError:
        problems.append(f"--network_args {key}={value}: must be a whole number")
        return 0
    if number < 0:
        problems.append(f"--network_args {key}={value}: must not be negative")
    return number


def parse_int_list(key: str, value: str, problems: list[str]) -> tuple[int, ...]:
    """A list of whole numbers such as `[4,0,8]` (brackets optional, empty items skipped)."""
    items = [item.strip() for item in value.strip("[] ").split(",") if item.strip()]
    return tuple(parse_int(key, item, problems) for item in items)


def parse_indices(key: str, value: str | None, problems: list[str]) -> frozenset[int] | None:
    """`all` (None), `none` or ranges such as `0-5,10` (sd-scripts' syntax)."""
    if value is None or value.strip() == "all":
        return None
    if value.strip() == "none":
        return frozenset()
    chosen: set[int] = set()
    for item in value.split(","):
        item = item.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not match:
            problems.append(f"--network_args {key}={value}: {item!r} is not an index or a range like 3-7")
            continue
        start, end = int(match[1]), int(match[2] or match[1])
        chosen.update(range(start, end + 1))
    return frozenset(chosen)
