"""`--sample_prompts` files: .txt lines with `--n --w --h --d --l --s --ss --g` options, .toml and .json.

Formats (sd-scripts inventory §7.2):
* `.txt`: one prompt per line; empty lines and `#` comments skipped; the line is split on " --" and every piece
  after the first is an option: `--w` width, `--h` height, `--d` seed, `--s` steps, `--l` CFG scale, `--g`
  guidance scale, `--n` negative prompt, `--ss` sampler, `--cn` control image, `--ctr`, `--rcfg`, `--fs`, and
  gen_img.py's `--f` file name (used by `lorakit sample`; training names its samples as sd-scripts does).
* `.toml`: a `[prompt]` table of defaults and `[[prompt.subset]]` entries (a subset's key wins; sd-scripts
  raises on a key present in both, which is not copied here).
* `.json`: a list of entries, each a table of the TOML keys or a string in the .txt syntax.
Every problem names the file and the line or entry.
"""

from __future__ import annotations

import json
import logging
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

log = logging.getLogger("lorakit")

# .txt flag -> (key, converter)
_FLAGS: dict[str, tuple[str, type]] = {
    "w": ("width", int), "h": ("height", int), "d": ("seed", int), "s": ("sample_steps", int),
    "l": ("scale", float), "g": ("guidance_scale", float), "n": ("negative_prompt", str),
    "ss": ("sample_sampler", str), "cn": ("controlnet_image", str), "ctr": ("cfg_trunc_ratio", float),
    "rcfg": ("renorm_cfg", float), "fs": ("flow_shift", float), "f": ("file_name", str),
}
_KEY_TYPES: dict[str, type] = {"prompt": str, **{key: conv for key, conv in _FLAGS.values()}}
_KEY_ALIASES = {"negative_prompt": "negative_prompt", "steps": "sample_steps", "sampler": "sample_sampler"}


@dataclass(frozen=True)
class SampleDefaults:
    """Values a prompt leaves out; a family may offer its own (FLUX samples with fewer steps)."""

    width: int = 512
    height: int = 512
    sample_steps: int = 30
    scale: float = 7.5
    guidance_scale: float | None = None
    size_multiple: int = 8


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image to make; `index` is its position in the file (used in the image name)."""

    index: int
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    sample_steps: int = 30
    scale: float = 7.5
    guidance_scale: float | None = None
    sample_sampler: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def _convert(value: Any, conv: type, where: str, key: str) -> Any:
    try:
        if conv is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        converted = conv(value) if conv is not str else str(value)
        if conv is float and not math.isfinite(converted):
            raise ValueError  # "nan" and "inf" read as floats; no prompt setting means anything with them
        return converted
    except (TypeError, ValueError, OverflowError):
        raise ConfigError([f"{where}: {key} must be {'an integer' if conv is int else 'a finite number'}, got {value!r}"]) from None


def parse_prompt_line(line: str, where: str) -> dict[str, Any]:
    """One .txt line as a dict of TOML keys."""
    pieces = line.split(" --")
    entry: dict[str, Any] = {"prompt": pieces[0].strip()}
    for piece in pieces[1:]:
        flag, _, value = piece.strip().partition(" ")
        spec = _FLAGS.get(flag.lower())
        if spec is None:
            # sd-scripts ignores options it does not know, so files written for it may carry some
            log.warning("%s: unknown option --%s ignored (known: %s)", where, flag, ", ".join("--" + f for f in _FLAGS))
            continue
        key, conv = spec
        if not value.strip():
            raise ConfigError([f"{where}: --{flag} needs a value"])
        entry[key] = _convert(value.strip(), conv, where, f"--{flag}")
    return entry


def _check_entry(entry: dict[str, Any], where: str) -> dict[str, Any]:
    checked: dict[str, Any] = {}
    for key, value in entry.items():
        key = _KEY_ALIASES.get(key, key)
        if key not in _KEY_TYPES:
            raise ConfigError([f"{where}: unknown key {key!r} (known: {', '.join(_KEY_TYPES)})"])
        checked[key] = _convert(value, _KEY_TYPES[key], where, key)
    if not checked.get("prompt", "").strip():
        raise ConfigError([f"{where}: the entry has no prompt"])
    return checked


def _read_txt(path: Path) -> list[tuple[dict[str, Any], str]]:
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        entries.append((parse_prompt_line(line, where), where))
    return entries


def _read_toml(path: Path) -> list[tuple[dict[str, Any], str]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML ({exc})"]) from None
    table = data.get("prompt")
    if not isinstance(table, dict):
        raise ConfigError([f"{path}: needs a [prompt] table with [[prompt.subset]] entries"])
    defaults = {k: v for k, v in table.items() if k != "subset"}
    subsets = table.get("subset", [])
    if not isinstance(subsets, list) or not subsets:
        raise ConfigError([f"{path}: [prompt] has no [[prompt.subset]] entries"])
    return [({**defaults, **subset}, f"{path}: [[prompt.subset]] #{i + 1}") for i, subset in enumerate(subsets)]


def _read_json(path: Path) -> list[tuple[dict[str, Any], str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{path}: not valid JSON ({exc})"]) from None
    if not isinstance(data, list):
        raise ConfigError([f"{path}: must hold a list of prompts"])
    entries = []
    for i, item in enumerate(data):
        where = f"{path}: entry {i + 1}"
        if isinstance(item, str):
            entries.append((parse_prompt_line(item, where), where))
        elif isinstance(item, dict):
            entries.append((item, where))
        else:
            raise ConfigError([f"{where}: must be a string or a table, got {type(item).__name__}"])
    return entries


def _finish(index: int, entry: dict[str, Any], defaults: SampleDefaults) -> SamplePrompt:
    multiple = defaults.size_multiple

    def size(key: str, fallback: int) -> int:
        return max(64, int(entry.get(key, fallback)) // multiple * multiple)

    known = {"prompt", "negative_prompt", "width", "height", "seed", "sample_steps", "scale", "guidance_scale",
             "sample_sampler"}
    return SamplePrompt(
        index=index, prompt=entry["prompt"].strip(), negative_prompt=entry.get("negative_prompt", ""),
        width=size("width", defaults.width), height=size("height", defaults.height), seed=entry.get("seed"),
        sample_steps=min(1000, max(1, int(entry.get("sample_steps", defaults.sample_steps)))),
        scale=float(entry.get("scale", defaults.scale)),
        guidance_scale=entry.get("guidance_scale", defaults.guidance_scale),
        sample_sampler=entry.get("sample_sampler"),
        extras={k: v for k, v in entry.items() if k not in known},
    )


def read_sample_prompts(path: str | Path, defaults: SampleDefaults | None = None) -> list[SamplePrompt]:
    """The prompts of a --sample_prompts file, with defaults filled in; ConfigError names any problem."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError([f"--sample_prompts {path}: no such file"])
    readers = {".txt": _read_txt, ".toml": _read_toml, ".json": _read_json}
    reader = readers.get(file.suffix.lower())
    if reader is None:
        raise ConfigError([f"--sample_prompts {path}: the file must end in .txt, .toml or .json"])
    entries = [(_check_entry(entry, where), where) for entry, where in reader(file)]
    if not entries:
        log.warning("--sample_prompts %s holds no prompts; no samples will be made", path)
    return [_finish(i, entry, defaults or SampleDefaults()) for i, (entry, _) in enumerate(entries)]
