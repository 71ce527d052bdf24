"""`--dataset_config` files (TOML or JSON) and the lookup order of dataset values (sd-scripts §3.1-3.2).

Schema: `[general]` (defaults for everything), `[[datasets]]` (resolution, batch size, bucketing, plus
subset defaults) and `[[datasets.subsets]]` (one image folder each). A value is taken from the first level
that sets it: subset -> dataset -> general -> command line -> built-in default. Every problem in the file
(unknown keys, keys at the wrong level, wrong types) is reported at once in one `DataError`.

The key tables below are data: adding a key (fine-tuning `metadata_file`, masks ...) is one row here and
one field in `specs.py`.
"""

from __future__ import annotations

import difflib
import json
import logging
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from lorakit.data.discovery import scan_repeat_folders
from lorakit.data.specs import DatasetPlan, DatasetSpec, SubsetSpec
from lorakit.errors import DataError

logger = logging.getLogger(__name__)

# Type names used by the checker: "bool", "int", "float", "str", "resolution".
SUBSET_KEYS: dict[str, str] = {  # allowed at every level ("ascendable" in sd-scripts)
    "num_repeats": "int", "class_tokens": "str", "caption_extension": "str", "keep_tokens": "int",
    "shuffle_caption": "bool", "caption_separator": "str", "caption_prefix": "str", "caption_suffix": "str",
    "flip_aug": "bool", "random_crop": "bool", "color_aug": "bool",
}
SUBSET_ONLY_KEYS: dict[str, str] = {"image_dir": "str", "is_reg": "bool"}
DATASET_KEYS: dict[str, str] = {  # allowed in [general] and [[datasets]]
    "resolution": "resolution", "batch_size": "int", "enable_bucket": "bool", "min_bucket_reso": "int",
    "max_bucket_reso": "int", "bucket_reso_steps": "int", "bucket_no_upscale": "bool",
}
# sd-scripts keys this version does not implement; a value other than the harmless default is an error.
NOT_IMPLEMENTED_KEYS: dict[str, Any] = {
    "face_crop_aug_range": None, "keep_tokens_separator": "", "secondary_separator": None,
    "enable_wildcard": False, "token_warmup_min": 1, "token_warmup_step": 0, "custom_attributes": None,
    "resize_interpolation": None, "caption_dropout_every_n_epochs": 0, "caption_dropout_rate": 0,
    "caption_tag_dropout_rate": 0, "cache_info": False, "alpha_mask": False, "metadata_file": None,
    "conditioning_data_dir": None, "validation_seed": None, "validation_split": 0,
    "network_multiplier": 1.0,
}
# Command-line option names that differ from the dataset key they default.
CLI_NAMES = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}
# Keys that only mean something when true; a true value is rejected until implemented.
UNSUPPORTED_WHEN_TRUE = ("color_aug",)

ALL_KEYS = {**SUBSET_KEYS, **SUBSET_ONLY_KEYS, **DATASET_KEYS}
_SUBSET_DEFAULTS = {f.name: f.default for f in fields(SubsetSpec) if f.name != "image_dir"}
_DATASET_DEFAULTS = {f.name: f.default for f in fields(DatasetSpec) if f.name not in ("subsets", "resolution")}


def read_dataset_config(path: str | Path) -> dict[str, Any]:
    """Parse a `.toml` or `.json` dataset config; unreadable or malformed files are a `DataError`."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"--dataset_config {file} does not exist")
    try:
        text = file.read_text(encoding="utf-8")
        data = json.loads(text) if file.suffix.lower() == ".json" else tomllib.loads(text)
    except UnicodeDecodeError:
        raise DataError(f"--dataset_config {file} is not UTF-8 text") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"--dataset_config {file} cannot be parsed: {err}") from None
    if not isinstance(data, dict):
        raise DataError(f"--dataset_config {file} must contain a table at the top level")
    return data


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, list(ALL_KEYS) + list(NOT_IMPLEMENTED_KEYS), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _type_problem(key: str, value: Any, kind: str) -> str | None:
    """Describe why `value` is not of the `kind` the key needs, or None when it is fine."""
    ok = {
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "resolution": lambda v: (isinstance(v, int) and not isinstance(v, bool) and v > 0) or (
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v)),
    }[kind](value)
    if ok:
        return None
    want = {"resolution": "a size like 512 or [768, 512]"}.get(kind, f"a {kind}")
    return f"{key} = {value!r} must be {want}"


def _check_table(table: Any, where: str, allowed: dict[str, str], misplaced: dict[str, str]) -> list[str]:
    """Problems of one table: unknown keys, keys that belong elsewhere, wrong types, unsupported values."""
    if not isinstance(table, dict):
        return [f"{where} must be a table"]
    problems: list[str] = []
    for key, value in table.items():
        if key in allowed:
            problem = _type_problem(key, value, allowed[key])
            if problem:
                problems.append(f"{where}: {problem}")
            elif key in UNSUPPORTED_WHEN_TRUE and value:
                problems.append(f"{where}: {key} = true is not implemented yet; remove it or set it to false")
        elif key in misplaced:
            problems.append(f"{where}: {key} is not allowed here; it belongs in {misplaced[key]}")
        elif key in NOT_IMPLEMENTED_KEYS:
            if value != NOT_IMPLEMENTED_KEYS[key]:
                problems.append(f"{where}: {key} is not implemented yet; remove it")
        else:
            problems.append(f"{where}: unknown key {key}{_did_you_mean(key)}")
    return problems


def validate_dataset_config(data: dict[str, Any], path: str | Path) -> None:
    """Raise one `DataError` listing every problem of a parsed dataset config."""
    subset_place = "[[datasets.subsets]]"
    dataset_place = "[general] or [[datasets]]"
    problems: list[str] = []
    for key in data:
        if key not in ("general", "datasets"):
            problems.append(f"unknown top-level section [{key}]{_did_you_mean(key)}; "
                            "expected [general] and [[datasets]]")
    general_allowed = {**SUBSET_KEYS, **DATASET_KEYS}
    only_in_subsets = {k: subset_place for k in SUBSET_ONLY_KEYS}
    problems += _check_table(data.get("general", {}), "[general]", general_allowed, only_in_subsets)
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        problems.append("no [[datasets]] entry; add [[datasets]] with at least one [[datasets.subsets]]")
        datasets = []
    for i, dataset in enumerate(datasets, start=1):
        where = f"[[datasets]] #{i}"
        if not isinstance(dataset, dict):
            problems.append(f"{where} must be a table")
            continue
        body = {k: v for k, v in dataset.items() if k != "subsets"}
        problems += _check_table(body, where, general_allowed, only_in_subsets)
        subsets = dataset.get("subsets")
        if not isinstance(subsets, list) or not subsets:
            problems.append(f"{where} has no [[datasets.subsets]] entry")
            continue
        subset_misplaced = {k: dataset_place for k in DATASET_KEYS}
        for j, subset in enumerate(subsets, start=1):
            sub_where = f"{where} subset #{j}"
            problems += _check_table(subset, sub_where, {**SUBSET_KEYS, **SUBSET_ONLY_KEYS}, subset_misplaced)
            if isinstance(subset, dict) and "image_dir" not in subset:
                problems.append(f"{sub_where}: image_dir is required")
    if problems:
        raise DataError(f"{len(problems)} problem(s) in dataset config {path}:\n"
                        + "\n".join(f"  - {p}" for p in problems))


def normalize_resolution(value: Any) -> tuple[int, int] | None:
    """(width, height) from 512, [768, 512], (768, 512) or the strings "512" / "768,512"."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [int(part) for part in value.split(",") if part.strip()]
    if isinstance(value, int):
        return (value, value)
    items = list(value)
    return (int(items[0]), int(items[0])) if len(items) == 1 else (int(items[0]), int(items[1]))


def lookup(key: str, levels: list[dict[str, Any]], cfg: Any, default: Any) -> Any:
    """First non-None value of `key` in the config levels (most specific first), then `cfg`, then default."""
    for level in levels:
        if level.get(key) is not None:
            return level[key]
    value = getattr(cfg, CLI_NAMES.get(key, key), None)
    return default if value is None else value


def _resolve_subset(levels: list[dict[str, Any]], cfg: Any, image_dir: Path, base: Path) -> SubsetSpec:
    values = {k: lookup(k, levels, cfg, d) for k, d in _SUBSET_DEFAULTS.items()}
    directory = image_dir if image_dir.is_absolute() else base / image_dir
    return SubsetSpec(image_dir=directory, **values)


def _resolve_dataset(levels: list[dict[str, Any]], cfg: Any, subsets: tuple[SubsetSpec, ...],
                     where: str) -> DatasetSpec:
    values = {k: lookup(k, levels, cfg, d) for k, d in _DATASET_DEFAULTS.items()}
    resolution = normalize_resolution(lookup("resolution", levels, cfg, None))
    if resolution is None:
        raise DataError(f"{where}: no resolution given; set resolution in the dataset config "
                        "or pass --resolution (e.g. --resolution 512 or --resolution 768,512)")
    return DatasetSpec(subsets=subsets, resolution=resolution, **values)


def plan_from_config_file(path: str | Path, cfg: Any) -> DatasetPlan:
    """Read, check and resolve a `--dataset_config` file into datasets of resolved subsets."""
    file = Path(path)
    data = read_dataset_config(file)
    validate_dataset_config(data, file)
    general = data.get("general", {})
    datasets: list[DatasetSpec] = []
    for i, dataset in enumerate(data["datasets"], start=1):
        body = {k: v for k, v in dataset.items() if k != "subsets"}
        # Relative image_dir values are taken as written, relative to the working folder, as sd-scripts does.
        subsets = tuple(_resolve_subset([sub, body, general], cfg, Path(sub["image_dir"]), Path.cwd())
                        for sub in dataset["subsets"])
        datasets.append(_resolve_dataset([body, general], cfg, subsets, f"dataset config {file} [[datasets]] #{i}"))
    return DatasetPlan(datasets=tuple(datasets), config_file=file)


def plan_from_folders(cfg: Any) -> DatasetPlan:
    """One dataset from the `N_name` folders of `--train_data_dir` (and `--reg_data_dir`)."""
    train_dir = getattr(cfg, "train_data_dir", None)
    if not train_dir:
        raise DataError("no training images given: pass --train_data_dir (a folder with subfolders named "
                        "like 10_mychar) or --dataset_config")
    folders = scan_repeat_folders(train_dir, is_reg=False)
    reg_dir = getattr(cfg, "reg_data_dir", None)
    if reg_dir:
        folders += scan_repeat_folders(reg_dir, is_reg=True)
    subsets = []
    for folder in folders:
        values = {k: lookup(k, [], cfg, d) for k, d in _SUBSET_DEFAULTS.items()}
        values.update(num_repeats=folder.num_repeats, class_tokens=folder.class_tokens, is_reg=folder.is_reg)
        subsets.append(SubsetSpec(image_dir=folder.path, **values))
    dataset = _resolve_dataset([], cfg, tuple(subsets), "the options")
    return DatasetPlan(datasets=(dataset,))


def plan_datasets(cfg: Any) -> DatasetPlan:
    """The datasets to train on, from `--dataset_config` if given, else from the image folders."""
    config_file = getattr(cfg, "dataset_config", None)
    if not config_file:
        return plan_from_folders(cfg)
    ignored = [name for name in ("train_data_dir", "reg_data_dir", "in_json") if getattr(cfg, name, None)]
    if ignored:
        logger.warning("--dataset_config is given, so %s %s ignored",
                       ", ".join("--" + n for n in ignored), "is" if len(ignored) == 1 else "are")
    return plan_from_config_file(config_file, cfg)
