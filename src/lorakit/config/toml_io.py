"""Reading and writing `--config_file` TOML files the way sd-scripts does.

Reading: all tables are flattened one level (section names are ignored), so `[model] network_dim = 16` and a
top-level `network_dim = 16` mean the same. Unknown keys are reported with the file, the line and a
did-you-mean. Writing (`--output_config`): the non-default options, grouped in one table per section
(section names are free, so files written here load in sd-scripts too).
"""

from __future__ import annotations

import difflib
import json
import math
import re
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.config.schema import SECTIONS, TrainConfig, section_of
from lorakit.errors import ConfigError

#: Options that make no sense inside the file they would be read from, or are secrets.
_NOT_WRITTEN = frozenset({"config_file", "output_config", "wandb_api_key", "huggingface_token", "caption_extention"})
_NOT_READ = frozenset({"config_file", "output_config"})
_DATASET_CONFIG_KEYS = frozenset({"general", "datasets"})


@dataclass
class FileOptions:
    """What a config file contributes: values, where each came from, and what is wrong in it."""

    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def config_path(name: str) -> Path:
    """sd-scripts appends ".toml" to a --config_file name that lacks it."""
    return Path(name if name.endswith(".toml") else name + ".toml")


def closest(name: str, known: set[str] | frozenset[str]) -> str | None:
    """The known option name closest to a misspelt one, or None when nothing is close."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return close[0] if close else None


def _key_line(text: str, key: str) -> int | None:
    pattern = re.compile(rf"""^\s*(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')\s*=""", re.MULTILINE)
    match = pattern.search(text)
    return text.count("\n", 0, match.start()) + 1 if match else None


def _flatten(data: dict[str, Any]) -> list[tuple[str, str | None, Any]]:
    """(key, section or None, value) for top-level keys and the keys of each top-level table."""
    items: list[tuple[str, str | None, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            items.extend((inner, key, inner_value) for inner, inner_value in value.items())
        else:
            items.append((key, None, value))
    return items


def read_config_file(name: str) -> FileOptions:
    """Read a --config_file; every problem is returned (not raised) so it can join the others."""
    path = config_path(name)
    result = FileOptions()
    if not path.is_file():
        result.problems.append(f"--config_file: {path} does not exist")
        return result
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        result.problems.append(f"{path}: not valid TOML: {error}")
        return result
    known = set(TrainConfig.model_fields)
    seen_in: dict[str, str | None] = {}
    for key, section, value in _flatten(data):
        line = _key_line(text, key)
        where = f"{path} line {line}" if line else str(path)
        if key in _NOT_READ:
            continue
        if key not in known:
            near = closest(key, known)
            hint = f" (did you mean {near!r}?)" if near else ""
            result.problems.append(f"{where}: unknown key {key!r}{_in_section(section)}{hint}")
            continue
        if key in seen_in:
            result.warnings.append(
                f"{path}: {key!r} is set{_in_section(seen_in[key]) or ' at the top level'} and again"
                f"{_in_section(section) or ' at the top level'}; the last one is used"
            )
        seen_in[key] = section
        result.values[key] = value
        result.origins[key] = where
    if _DATASET_CONFIG_KEYS.intersection(data):
        result.problems.append(
            f"{path} looks like a dataset config ([general]/[[datasets]]); pass it with --dataset_config"
        )
    return result


def _in_section(section: str | None) -> str:
    return f" in [{section}]" if section else ""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are a subset of TOML basic-string escapes.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _file_form(name: str, value: Any) -> Any:
    # sd-scripts splits these two on "," itself, so they must be strings in its config files.
    if name in ("resolution", "face_crop_aug_range") and value is not None:
        return ",".join(str(part) for part in value)
    return value


def config_to_toml(cfg: TrainConfig) -> str:
    """The non-default options of `cfg` as TOML text, one table per section."""
    chosen = {k: v for k, v in cfg.non_default_options().items() if k not in _NOT_WRITTEN and v is not None}
    blocks = []
    for section in SECTIONS:
        names = [name for name in chosen if section_of(name) == section.SECTION]
        lines = [f"{name} = {_toml_value(_file_form(name, chosen[name]))}" for name in names]
        if lines:
            blocks.append(f"[{section.SECTION}]\n" + "\n".join(sorted(lines)) + "\n")
    return "\n".join(blocks)


def write_config_file(cfg: TrainConfig, name: str) -> Path:
    """Write `config_to_toml(cfg)` to the --config_file path; never overwrite an existing file."""
    path = config_path(name)
    if path.exists():
        raise ConfigError([f"--output_config: {path} already exists; choose another --config_file or delete it"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_toml(cfg), encoding="utf-8")
    return path
