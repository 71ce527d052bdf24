"""argparse `type=` checks for the numeric options of `lorakit lora …` and `lorakit sample`.

Python's `float()` accepts "nan", "inf" and "-inf", and `int()` accepts 0 and negative numbers, so an option
such as `--ratios nan` or `--new_rank -1` used to reach the arithmetic (a NaN model, an SVD of rank -1, a
traceback). Each check here names the option and the rule in argparse's one-line error (status 2).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, Callable

__all__ = [
    "OneLineErrorParser", "dynamic_param_problems", "finite_float", "fraction", "json_number_list", "non_negative_float", "positive_float", "positive_int",
    "recipe_text", "seed",
]


def _number(text: str, kind: Callable[[str], Any]) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (a merge ratio may be negative: it subtracts a LoRA)."""
    return _number(text, float)


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A share in (0, 1], such as a quantile or a fraction of a norm."""
    value = _number(text, float)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A rank, a size or a count: 1 or more."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text!r}")
    return value


def seed(text: str) -> int:
    """A random seed: a whole number from 0 to 2^64 - 1 (what torch's generators take)."""
    value = _number(text, int)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2^64 - 1, got {text!r}")
    return value


def json_number_list(text: str) -> str:
    """A JSON list of numbers (`--lbws "[1,0.5,…]"`), passed on as text; JSON's NaN and Infinity are refused
    here (the list's length and meaning are checked by the tool)."""
    try:
        values = json.loads(text)
    except ValueError:
        return text  # the tool reports what a list should look like
    numbers = values if isinstance(values, list) else []
    if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
        raise argparse.ArgumentTypeError(f"every weight must be a finite number, got {text!r}")
    return text


def recipe_text(text: str) -> str:
    """A `key=value,…` resize recipe, passed on as text; its values must be finite numbers."""
    for part in text.replace(":", ",").split(","):
        key, has_value, value = part.partition("=")
        if not has_value:
            continue
        try:
            number = float(value)
        except ValueError:
            continue  # the recipe parser names the key
        if not math.isfinite(number):
            raise argparse.ArgumentTypeError(f"{key.strip()}={value.strip()}: must be a finite number")
    return text


def dynamic_param_problems(method: str, value: float) -> list[str]:
    """`--dynamic_param` for its method: sv_ratio keeps singular values above S₀/p (so p ≥ 1 keeps any);
    sv_fro and sv_cumulative take the fraction of the norm or sum to keep, in (0, 1]."""
    if method == "sv_ratio" and value < 1:
        return [f"--dynamic_param {value:g}: sv_ratio keeps the singular values above the largest / p, so p must be 1 or more"]
    if method in ("sv_fro", "sv_cumulative") and not 0 < value <= 1:
        return [f"--dynamic_param {value:g}: {method} keeps this fraction of the LoRA, so it must be in (0, 1]"]
    return []


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with its errors on one line (argparse prints the whole usage block first, which buries the
    message); `--help` still shows the usage."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")
