"""Build a `TrainConfig` from raw option values and report every problem at once, in the user's words.

pydantic stops at nothing (it collects all field errors) but its messages name Python types and locations.
Here each field error becomes "--network_dim: must be >= 1 (got 0)" (or names the TOML file the value came
from), and the cross-field rules are still run on the remaining valid fields, so one run shows everything.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from lorakit.config.schema import TrainConfig
from lorakit.errors import ConfigError

_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}
_KIND_MESSAGES = {
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be text",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "extra_forbidden": "is not a known option",
}


def _shown(value: Any) -> str:
    """Numbers (also numeric strings from the command line) unquoted, other text quoted."""
    if isinstance(value, str):
        try:
            float(value)
            return value
        except ValueError:
            return repr(value)
    return repr(value)


def _explain(error: dict[str, Any]) -> str:
    kind = error["type"]
    context = error.get("ctx") or {}
    if kind in _BOUNDS:
        symbol, key = _BOUNDS[kind]
        bound = context.get(key)
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)  # "must be < 1", not "must be < 1.0"
        message = f"must be {symbol} {bound}"
    elif kind == "literal_error":
        message = f"must be one of {context.get('expected')}"
    elif kind == "value_error":
        message = str(error["msg"]).removeprefix("Value error, ")
    else:
        message = _KIND_MESSAGES.get(kind, str(error["msg"]))
    if "(got" not in message and kind != "extra_forbidden":
        message += f" (got {_shown(error['input'])})"
    return message


def option_label(name: str, origins: dict[str, str] | None) -> str:
    """`--name` for a command-line value, `name in <file>` for a value from a config file."""
    origin = (origins or {}).get(name)
    return f"{name} in {origin}" if origin else f"--{name}"


def describe_field_errors(error: ValidationError, origins: dict[str, str] | None = None) -> dict[str, str]:
    """One readable message per failing option (the first error of each), keyed by option name."""
    messages: dict[str, str] = {}
    for item in error.errors():
        location = item.get("loc") or ()
        name = str(location[0]) if location else ""
        if name in messages:
            continue
        label = option_label(name, origins) if name else "options"
        if len(location) > 1 and isinstance(location[1], int):
            label += f" (value {location[1] + 1})"
        messages[name] = f"{label}: {_explain(item)}"
    return messages


def check_options(
    options: dict[str, Any],
    origins: dict[str, str] | None = None,
    skip_requirements: bool = False,
) -> tuple[TrainConfig | None, list[str]]:
    """Validate `options` (field name -> raw value); return a config and every problem found.

    The config is built from the options that are valid on their own (bad ones fall back to their default),
    so callers can run further checks on it; it is None only if even that fails. `origins` maps an option
    to the file it came from, for the messages. `skip_requirements` drops the "required input missing"
    rules (used when only writing a config file).
    """
    collected: list[str] = []
    context: dict[str, Any] = {"skip_requirements": skip_requirements, "collected_problems": collected}
    try:
        return TrainConfig.model_validate(options, context=context), collected
    except ValidationError as error:
        field_messages = describe_field_errors(error, origins)
    # Validate again without the bad fields so the cross-field rules still report what else is wrong.
    context["skip_fields"] = set(field_messages)
    collected.clear()
    remaining = {k: v for k, v in options.items() if k not in field_messages}
    problems = list(field_messages.values())
    try:
        config: TrainConfig | None = TrainConfig.model_validate(remaining, context=context)
    except ValidationError as error:  # defensive: should not happen once the bad fields are removed
        config = None
        problems.extend(describe_field_errors(error, origins).values())
    return config, problems + collected


def build_config(
    options: dict[str, Any],
    origins: dict[str, str] | None = None,
    skip_requirements: bool = False,
) -> TrainConfig:
    """Like `check_options`, but return the config only when there is no problem; else raise ConfigError."""
    config, problems = check_options(options, origins, skip_requirements)
    if problems or config is None:
        raise ConfigError(problems or ["the options could not be validated"])
    return config
