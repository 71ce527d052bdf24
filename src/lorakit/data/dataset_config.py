"""`--dataset_config` files (TOML or JSON) and the lookup order of dataset values (sd-scripts §3.1-3.2).

Schema: `[general]` (defaults for everything), `[[datasets]]` (resolution, batch size, bucketing, plus
subset defaults) and `[[datasets.subsets]]` (one image folder or metadata file each). A value is taken from
the first level that sets it: subset -> dataset -> general -> command line -> built-in default. Every
problem in the file (unknown keys, keys at the wrong level, wrong types, mixed dataset kinds) is reported at
once in one `DataError`.

A dataset's kind follows from its subsets' keys, as in sd-scripts: `metadata_file` makes a fine-tuning
subset, `conditioning_data_dir` a conditioning subset, anything else a DreamBooth folder. Whether conditioning
subsets are allowed, needed or only taken as loss masks is the training type's `ConditioningUse`.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from lorakit.data.conditioning import ConditioningUse
from lorakit.data.discovery import scan_repeat_folders
from lorakit.data.specs import CONDITIONING, DREAMBOOTH, FINE_TUNING, DatasetPlan, DatasetSpec, SubsetSpec
from lorakit.errors import DataError

logger = logging.getLogger(__name__)

# Type names used by the checker: bool, int, number, str, resolution, float_pair, table.
SUBSET_KEYS: dict[str, str] = {  # allowed at every level ("ascendable" in sd-scripts)
    "num_repeats": "count", "class_tokens": "str", "caption_extension": "str", "cache_info": "bool",
    "keep_tokens": "int", "keep_tokens_separator": "str", "shuffle_caption": "bool", "caption_separator": "str",
    "secondary_separator": "str", "enable_wildcard": "bool", "caption_prefix": "str", "caption_suffix": "str",
    "caption_dropout_rate": "number", "caption_dropout_every_n_epochs": "int",
    "caption_tag_dropout_rate": "number", "token_warmup_min": "int", "token_warmup_step": "number",
    "flip_aug": "bool", "random_crop": "bool", "color_aug": "bool", "face_crop_aug_range": "float_pair",
    "resize_interpolation": "interpolation", "custom_attributes": "table",
}
SUBSET_ONLY_KEYS: dict[str, str] = {
    "image_dir": "str", "is_reg": "bool", "alpha_mask": "bool", "metadata_file": "str",
    "conditioning_data_dir": "str",
}
DATASET_KEYS: dict[str, str] = {  # allowed in [general] and [[datasets]]
    "resolution": "resolution", "batch_size": "int", "enable_bucket": "bool", "min_bucket_reso": "int",
    "max_bucket_reso": "int", "bucket_reso_steps": "int", "bucket_no_upscale": "bool",
    "network_multiplier": "number", "validation_split": "fraction", "validation_seed": "int",
}
# sd-scripts keys this version does not implement; a value other than the harmless default is an error.
NOT_IMPLEMENTED_KEYS: dict[str, Any] = {}
# Keys a subset of a given kind must not have (beyond the subset-only keys that define the kind).
KIND_FORBIDDEN: dict[str, tuple[str, ...]] = {
    DREAMBOOTH: (),
    FINE_TUNING: ("is_reg", "class_tokens", "conditioning_data_dir"),
    CONDITIONING: ("is_reg", "metadata_file"),
}
KIND_NAMES = {DREAMBOOTH: "DreamBooth (image_dir)", FINE_TUNING: "fine-tuning (metadata_file)",
              CONDITIONING: "conditioning (conditioning_data_dir)"}
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
# Command-line option names that differ from the dataset key they default.
CLI_NAMES = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}
# Subset-only keys that still fall back to a command-line option (sd-scripts searches argparse for them).
CLI_SUBSET_ONLY = ("alpha_mask",)

ALL_KEYS = {**SUBSET_KEYS, **SUBSET_ONLY_KEYS, **DATASET_KEYS}
_SUBSET_DEFAULTS = {f.name: f.default for f in fields(SubsetSpec)
                    if f.name not in ("image_dir", "metadata_file", "conditioning_data_dir", "custom_attributes")}
_DATASET_DEFAULTS = {f.name: f.default for f in fields(DatasetSpec) if f.name not in ("subsets", "resolution", "kind")}


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


def _did_you_mean(key: str, candidates: list[str] | None = None) -> str:
    pool = candidates if candidates is not None else list(ALL_KEYS) + list(NOT_IMPLEMENTED_KEYS)
    close = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_CHECKS = {
    "bool": lambda v: isinstance(v, bool),
    "int": _is_int,
    "count": lambda v: _is_int(v) and v >= 1,
    "number": _is_number,
    "fraction": lambda v: _is_number(v) and 0 <= v < 1,
    "str": lambda v: isinstance(v, str),
    "table": lambda v: isinstance(v, dict),
    "interpolation": lambda v: isinstance(v, str) and v in INTERPOLATIONS,
    "resolution": lambda v: (_is_int(v) and v > 0) or (
        isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)),
    "float_pair": lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v) and v[0] <= v[1],
}
_WANTED = {"count": "a whole number of at least 1 (0 or fewer repeats would never show the images)",
           "resolution": "a size like 512 or [768, 512]", "float_pair": "[low, high] with low <= high",
           "fraction": "a number from 0 up to (not including) 1",
           "number": "a number", "interpolation": "one of " + ", ".join(INTERPOLATIONS)}


def _type_problem(key: str, value: Any, kind: str) -> str | None:
    """Describe why `value` is not of the `kind` the key needs, or None when it is fine."""
    if _CHECKS[kind](value):
        return None
    return f"{key} = {value!r} must be {_WANTED.get(kind, f'a {kind}')}"


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
        elif key in misplaced:
            problems.append(f"{where}: {key} is not allowed here; it belongs in {misplaced[key]}")
        elif key in NOT_IMPLEMENTED_KEYS:
            if value != NOT_IMPLEMENTED_KEYS[key]:
                problems.append(f"{where}: {key} is not implemented yet; remove it")
        else:
            problems.append(f"{where}: unknown key {key}{_did_you_mean(key)}")
    return problems


def subset_kind(subset: dict[str, Any]) -> str:
    """The kind of one subset table, from the keys that define it."""
    if "conditioning_data_dir" in subset:
        return CONDITIONING
    if "metadata_file" in subset:
        return FINE_TUNING
    return DREAMBOOTH


def _check_subset_kind(subset: dict[str, Any], where: str, use: ConditioningUse, masked_loss: bool) -> list[str]:
    """Rules that depend on the subset's kind (required keys, forbidden keys, what conditioning is for)."""
    kind = subset_kind(subset)
    if use is ConditioningUse.REQUIRED and kind != CONDITIONING:
        return [f"{where}: conditioning_data_dir is required (this training learns from image and conditioning "
                "image pairs)"]
    problems = [f"{where}: {key} is not allowed in a {KIND_NAMES[kind]} subset"
                for key in KIND_FORBIDDEN[kind] if key in subset]
    if kind != FINE_TUNING and "image_dir" not in subset:
        problems.append(f"{where}: image_dir is required")
    if kind == CONDITIONING:
        if subset.get("random_crop"):
            problems.append(f"{where}: random_crop cannot be used with conditioning_data_dir")
        if subset.get("alpha_mask"):
            problems.append(f"{where}: alpha_mask cannot be used with conditioning_data_dir (the "
                            "conditioning image is the mask)")
        if use is ConditioningUse.MASK and not masked_loss:
            problems.append(f"{where}: conditioning_data_dir needs --masked_loss (this training uses conditioning "
                            "images only as loss masks)")
    return problems


def _check_dataset(dataset: Any, where: str, general_allowed: dict[str, str], use: ConditioningUse,
                   masked_loss: bool) -> list[str]:
    if not isinstance(dataset, dict):
        return [f"{where} must be a table"]
    only_in_subsets = {k: "[[datasets.subsets]]" for k in SUBSET_ONLY_KEYS}
    body = {k: v for k, v in dataset.items() if k != "subsets"}
    problems = _check_table(body, where, general_allowed, only_in_subsets)
    subsets = dataset.get("subsets")
    if not isinstance(subsets, list) or not subsets:
        return problems + [f"{where} has no [[datasets.subsets]] entry"]
    subset_misplaced = {k: "[general] or [[datasets]]" for k in DATASET_KEYS}
    kinds = set()
    for j, subset in enumerate(subsets, start=1):
        sub_where = f"{where} subset #{j}"
        problems += _check_table(subset, sub_where, {**SUBSET_KEYS, **SUBSET_ONLY_KEYS}, subset_misplaced)
        if isinstance(subset, dict):
            problems += _check_subset_kind(subset, sub_where, use, masked_loss)
            kinds.add(subset_kind(subset))
    if len(kinds) > 1:
        problems.append(f"{where} mixes subset kinds ({', '.join(KIND_NAMES[k] for k in sorted(kinds))}); "
                        "put each kind in its own [[datasets]]")
    return problems


def validate_dataset_config(data: dict[str, Any], path: str | Path, masked_loss: bool = False,
                            use: ConditioningUse = ConditioningUse.MASK) -> None:
    """Raise one `DataError` listing every problem of a parsed dataset config."""
    problems: list[str] = []
    for key in data:
        if key not in ("general", "datasets"):
            problems.append(f"unknown top-level section [{key}]{_did_you_mean(key, ['general', 'datasets'])}; "
                            "expected [general] and [[datasets]]")
    general_allowed = {**SUBSET_KEYS, **DATASET_KEYS}
    only_in_subsets = {k: "[[datasets.subsets]]" for k in SUBSET_ONLY_KEYS}
    problems += _check_table(data.get("general", {}), "[general]", general_allowed, only_in_subsets)
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        problems.append("no [[datasets]] entry; add [[datasets]] with at least one [[datasets.subsets]]")
        datasets = []
    for i, dataset in enumerate(datasets, start=1):
        problems += _check_dataset(dataset, f"[[datasets]] #{i}", general_allowed, use, masked_loss)
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


def _cli_value(cfg: Any, key: str) -> Any:
    if key == "caption_extension" and getattr(cfg, "caption_extention", None):
        return cfg.caption_extention  # sd-scripts' legacy spelling wins when given
    return getattr(cfg, CLI_NAMES.get(key, key), None)


def lookup(key: str, levels: list[dict[str, Any]], cfg: Any, default: Any) -> Any:
    """First non-None value of `key` in the config levels (most specific first), then `cfg`, then default."""
    for level in levels:
        if level.get(key) is not None:
            return level[key]
    value = _cli_value(cfg, key)
    return default if value is None else value


def _subset_values(levels: list[dict[str, Any]], cfg: Any) -> dict[str, Any]:
    values = {k: lookup(k, levels, cfg, d) for k, d in _SUBSET_DEFAULTS.items()}
    if values["face_crop_aug_range"] is not None:
        values["face_crop_aug_range"] = tuple(float(x) for x in values["face_crop_aug_range"])
    return values


def _path(value: str | None) -> Path | None:
    # Relative paths are taken as written, relative to the working folder, as sd-scripts does.
    return None if value is None else Path(value).expanduser()


def _require_repeats(values: dict[str, Any], where: str) -> None:
    """A subset repeated 0 or fewer times would never be seen (with --dataset_repeats 0 from the command line)."""
    if values["num_repeats"] < 1:
        raise DataError(f"{where}: num_repeats {values['num_repeats']} (from --dataset_repeats) must be at least 1")


def _resolve_subset(sub: dict[str, Any], levels: list[dict[str, Any]], cfg: Any) -> SubsetSpec:
    values = _subset_values([sub, *levels], cfg)
    _require_repeats(values, f"subset {sub.get('image_dir') or sub.get('metadata_file')}")
    for key in ("is_reg",):
        values[key] = bool(sub.get(key, False))
    # a table, taken whole from the first level that has one (no command-line option sets it)
    attributes = next((level["custom_attributes"] for level in [sub, *levels] if level.get("custom_attributes")), None)
    return SubsetSpec(image_dir=_path(sub.get("image_dir")), metadata_file=_path(sub.get("metadata_file")),
                      conditioning_data_dir=_path(sub.get("conditioning_data_dir")), custom_attributes=attributes,
                      **values)


def _resolve_dataset(levels: list[dict[str, Any]], cfg: Any, subsets: tuple[SubsetSpec, ...],
                     where: str, kind: str = DREAMBOOTH) -> DatasetSpec:
    values = {k: lookup(k, levels, cfg, d) for k, d in _DATASET_DEFAULTS.items()}
    resolution = normalize_resolution(lookup("resolution", levels, cfg, None))
    if resolution is None:
        raise DataError(f"{where}: no resolution given; set resolution in the dataset config "
                        "or pass --resolution (e.g. --resolution 512 or --resolution 768,512)")
    if float(values["network_multiplier"]) != 1.0:
        logger.warning("%s: network_multiplier has no effect on LoRA training (as in sd-scripts)", where)
    return DatasetSpec(subsets=subsets, resolution=resolution, kind=kind, **values)


def plan_from_config_file(path: str | Path, cfg: Any, use: ConditioningUse = ConditioningUse.MASK) -> DatasetPlan:
    """Read, check and resolve a `--dataset_config` file into datasets of resolved subsets."""
    file = Path(path)
    data = read_dataset_config(file)
    validate_dataset_config(data, file, bool(getattr(cfg, "masked_loss", False)), use)
    general = data.get("general", {})
    datasets: list[DatasetSpec] = []
    for i, dataset in enumerate(data["datasets"], start=1):
        body = {k: v for k, v in dataset.items() if k != "subsets"}
        subsets = tuple(_resolve_subset(sub, [body, general], cfg) for sub in dataset["subsets"])
        kind = subset_kind(dataset["subsets"][0])
        datasets.append(_resolve_dataset([body, general], cfg, subsets, f"dataset config {file} [[datasets]] #{i}",
                                         kind))
    return DatasetPlan(datasets=tuple(datasets), config_file=file)


def _conditioning_dir_for(cfg: Any, folder: Path) -> Path | None:
    """Folder mode with --conditioning_data_dir: a same-named subfolder if present, else the folder itself."""
    root = getattr(cfg, "conditioning_data_dir", None)
    if not root:
        return None
    sub = Path(root) / folder.name
    return sub if sub.is_dir() else Path(root)


def plan_from_folders(cfg: Any, use: ConditioningUse = ConditioningUse.MASK) -> DatasetPlan:
    """One dataset from the `N_name` folders of `--train_data_dir` (and `--reg_data_dir`).

    `--conditioning_data_dir` pairs them with conditioning images (with --masked_loss only, when the training
    type takes them as masks): a subfolder of the same name when there is one, else the folder itself.
    """
    if use is ConditioningUse.REQUIRED:
        return plan_from_pair_folders(cfg)
    train_dir = getattr(cfg, "train_data_dir", None)
    if not train_dir:
        raise DataError("no training images given: pass --train_data_dir (a folder with subfolders named "
                        "like 10_mychar) or --dataset_config")
    folders = scan_repeat_folders(train_dir, is_reg=False)
    reg_dir = getattr(cfg, "reg_data_dir", None)
    if reg_dir:
        folders += scan_repeat_folders(reg_dir, is_reg=True)
    wanted = bool(getattr(cfg, "masked_loss", False)) or use is ConditioningUse.OPTIONAL
    paired = wanted and getattr(cfg, "conditioning_data_dir", None)
    subsets = []
    for folder in folders:
        values = _subset_values([], cfg)
        values.update(num_repeats=folder.num_repeats, class_tokens=folder.class_tokens, is_reg=folder.is_reg)
        conditioning = _conditioning_dir_for(cfg, folder.path) if paired and not folder.is_reg else None
        subsets.append(SubsetSpec(image_dir=folder.path, conditioning_data_dir=conditioning, **values))
    dataset = _resolve_dataset([], cfg, tuple(subsets), "the options")
    return DatasetPlan(datasets=(dataset,))


def plan_from_pair_folders(cfg: Any) -> DatasetPlan:
    """sd-scripts' ControlNet trainers without a dataset config: `--train_data_dir` holds the images themselves
    (one subset, 1 repeat) and `--conditioning_data_dir` their conditioning images."""
    train_dir, pair_dir = getattr(cfg, "train_data_dir", None), getattr(cfg, "conditioning_data_dir", None)
    missing = [f"--{name} is required (or --dataset_config)" for name, value in
               (("train_data_dir", train_dir), ("conditioning_data_dir", pair_dir)) if not value]
    if missing:
        raise DataError("; ".join(missing) + ": this training learns from image and conditioning image pairs")
    values = _subset_values([], cfg)
    values.update(num_repeats=1)
    if values["random_crop"]:
        raise DataError("--random_crop cannot be used with conditioning images (sd-scripts refuses it too)")
    subset = SubsetSpec(image_dir=_path(train_dir), conditioning_data_dir=_path(pair_dir), **values)
    return DatasetPlan(datasets=(_resolve_dataset([], cfg, (subset,), "the options", CONDITIONING),))


def plan_from_in_json(cfg: Any) -> DatasetPlan:
    """One fine-tuning dataset from `--in_json` (metadata) and `--train_data_dir` (its image folder)."""
    values = _subset_values([], cfg)
    _require_repeats(values, f"--in_json {cfg.in_json}")
    train_dir = getattr(cfg, "train_data_dir", None)
    subset = SubsetSpec(image_dir=_path(train_dir), metadata_file=Path(cfg.in_json), **values)
    dataset = _resolve_dataset([], cfg, (subset,), "the options", FINE_TUNING)
    return DatasetPlan(datasets=(dataset,))


def plan_datasets(cfg: Any, use: ConditioningUse = ConditioningUse.MASK) -> DatasetPlan:
    """The datasets to train on: `--dataset_config` if given, else `--in_json`, else the image folders."""
    config_file = getattr(cfg, "dataset_config", None)
    if not config_file:
        if getattr(cfg, "in_json", None) and use is not ConditioningUse.REQUIRED:
            return plan_from_in_json(cfg)
        return plan_from_folders(cfg, use)
    ignored = [name for name in ("train_data_dir", "reg_data_dir", "in_json", "conditioning_data_dir")
               if getattr(cfg, name, None)]
    if ignored:
        logger.warning("--dataset_config is given, so %s %s ignored",
                       ", ".join("--" + n for n in ignored), "is" if len(ignored) == 1 else "are")
    return plan_from_config_file(config_file, cfg, use)
