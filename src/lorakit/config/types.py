"""Value types shared by the option schema: choice lists and parsers for sd-scripts' string forms.

sd-scripts receives most values as strings from argparse (or untouched from TOML), then splits them by hand
(`"512,768"`, `"10%"`, `"key=value"`). The parsers here accept every form sd-scripts accepts, return one
normalised Python value, and raise ValueError with a sentence a user can act on.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Literal

MixedPrecision = Literal["no", "fp16", "bf16"]
BaseQuant = Literal["fp8", "fp8_scaled", "int8", "nf4"]
SavePrecision = Literal["float", "fp16", "bf16"]
SaveModelAs = Literal["safetensors", "ckpt", "pt", "diffusers", "diffusers_safetensors"]
LossType = Literal["l1", "l2", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]
WeightingScheme = Literal["sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform"]
TimestepSampling = Literal["sigma", "uniform", "sigmoid", "shift", "flux_shift"]
ModelPredictionType = Literal["raw", "additive", "sigma_scaled"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LogWith = Literal["tensorboard", "wandb", "all"]
OffloadDevice = Literal["cpu", "nvme"]
ResizeInterpolation = Literal["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"]
LrScheduler = Literal[
    # sd-scripts' own list
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "adafactor",
    # reachable through the diffusers/transformers scheduler factory
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "piecewise_constant",
    "reduce_lr_on_plateau",
]
SampleSampler = Literal[
    "ddim",
    "pndm",
    "lms",
    "euler",
    "euler_a",
    "heun",
    "dpm_2",
    "dpm_2_a",
    "dpmsolver",
    "dpmsolver++",
    "dpmsingle",
    "k_lms",
    "k_euler",
    "k_euler_a",
    "k_dpm_2",
    "k_dpm_2_a",
]

#: Token lengths sd-scripts supports for SD/SDXL prompts: 1, 2 or 3 chunks of 75 tokens.
MAX_TOKEN_LENGTHS = (75, 150, 225)

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def _positive_ints(parts: list[Any], what: str) -> list[int]:
    values = []
    for part in parts:
        if isinstance(part, bool):
            raise ValueError(f"{what} must be integers (got {part!r})")
        try:
            number = int(str(part).strip())
        except ValueError:
            raise ValueError(f"{what} must be integers (got {part!r})") from None
        if number < 1:
            raise ValueError(f"{what} must be positive (got {number})")
        values.append(number)
    return values


def parse_resolution(value: Any) -> tuple[int, int] | None:
    """`"512"`, `512`, `"512,768"`, `[512, 768]` -> (width, height); one number means a square."""
    if value is None:
        return None
    if isinstance(value, str):
        parts: list[Any] = [p for p in value.split(",")]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    if len(parts) not in (1, 2):
        raise ValueError(f"must be 'SIZE' or 'WIDTH,HEIGHT' (got {value!r})")
    sizes = _positive_ints(parts, "sizes")
    return (sizes[0], sizes[-1])


def parse_float_pair(value: Any) -> tuple[float, float] | None:
    """`"0.2,0.5"` or `[0.2, 0.5]` -> (0.2, 0.5) with lo <= hi (used by face_crop_aug_range)."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    if len(parts) != 2:
        raise ValueError(f"must be two numbers 'LOW,HIGH' (got {value!r})")
    try:
        low, high = (float(str(p).strip()) for p in parts)
    except ValueError:
        raise ValueError(f"must be two numbers 'LOW,HIGH' (got {value!r})") from None
    if low > high:
        raise ValueError(f"the first number must not exceed the second (got {value!r})")
    return (low, high)


def parse_steps_or_ratio(value: Any) -> int | float | str:
    """sd-scripts' `int_or_float`: an int number of steps, a float ratio < 1, or a "N%" string.

    The raw form is kept (an int, a float ratio, or the "N%" string) so the option can be written back
    unchanged; `steps_from(value, total)` turns it into a number of steps.
    """
    if isinstance(value, bool):
        raise ValueError(f"must be a number of steps, a ratio below 1 or 'N%' (got {value!r})")
    if isinstance(value, str):
        text = value.strip()
        match = _PERCENT.match(text)
        if match:
            if float(match.group(1)) > 100:
                raise ValueError(f"a percentage must be at most 100% (got {value!r})")
            return text.replace(" ", "")
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"must be a number of steps, a ratio below 1 or 'N%' (got {value!r})") from None
    if isinstance(value, float):
        if value.is_integer() and value >= 1:
            return int(value)
        if not 0 <= value < 1:
            raise ValueError(f"a ratio must be in [0, 1) (got {value}); write whole steps as an integer")
        return value
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must be >= 0 (got {value})")
        return value
    raise ValueError(f"must be a number of steps, a ratio below 1 or 'N%' (got {value!r})")


def steps_from(value: int | float | str, total_steps: int) -> int:
    """Resolve a value accepted by `parse_steps_or_ratio` against the total number of steps."""
    if isinstance(value, str):
        ratio = float(value.rstrip("%")) / 100
        return int(ratio * total_steps)
    if isinstance(value, float):
        return int(value * total_steps)
    return int(value)


def as_list(value: Any) -> Any:
    """Options declared with nargs="*" may be written as one scalar in TOML; wrap it into a list."""
    if value is None or isinstance(value, (list, tuple)):
        return value
    return [value]


def split_key_values(items: list[str] | None, option: str) -> dict[str, str]:
    """`["conv_dim=8", "algo=locon"]` -> {"conv_dim": "8", "algo": "locon"}, split at the first "="."""
    result: dict[str, str] = {}
    bad = [item for item in items or [] if "=" not in str(item)]
    if bad:
        # Imported here because errors.py is a leaf module and this keeps types.py importable alone.
        from lorakit.errors import ConfigError

        raise ConfigError([f"--{option}: {item!r} is not of the form key=value" for item in bad])
    for item in items or []:
        key, _, raw = str(item).partition("=")
        result[key.strip()] = raw.strip()
    return result


def literal_or_string(text: str) -> Any:
    """Parse a value like sd-scripts' optimizer_args: Python literal if possible, else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text
