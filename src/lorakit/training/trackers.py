"""Experiment logging through accelerate's trackers (TensorBoard, Weights & Biases), named as in sd-scripts."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def tracker_names(cfg: Any) -> list[str]:
    """`--log_with` resolved: None means TensorBoard when --logging_dir is given, as sd-scripts does."""
    chosen = cfg.log_with or ("tensorboard" if cfg.logging_dir else None)
    if chosen is None:
        return []
    names = ["tensorboard", "wandb"] if chosen == "all" else [chosen]
    missing = [PACKAGES[n] for n in names if importlib.util.find_spec(PACKAGES[n]) is None]
    if missing:
        raise ConfigError([f"--log_with {chosen} needs {' and '.join(missing)}: pip install {' '.join(missing)}"])
    if "tensorboard" in names and not cfg.logging_dir:
        raise ConfigError(["--log_with tensorboard needs --logging_dir (the folder for the event files)"])
    return names


def logging_dir(cfg: Any) -> str | None:
    """`<logging_dir>/<log_prefix><YYYYmmddHHMMSS>`, one folder per run."""
    if not cfg.logging_dir:
        return None
    return str(Path(cfg.logging_dir) / f"{cfg.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}")


def tracker_config(cfg: Any) -> dict[str, Any]:
    """The run's options as tracker hyper-parameters (plain values only; secrets left out)."""
    secret = {"wandb_api_key", "huggingface_token"}
    return {k: v for k, v in cfg.model_dump().items() if k not in secret and isinstance(v, (int, float, str, bool))}


def read_tracker_init_kwargs(path: str) -> dict[str, Any]:
    """`--log_tracker_config`: a TOML file whose tables are passed to each tracker's init (sd-scripts' format)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    file = Path(path)
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError([f"--log_tracker_config {path}: file not found"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"--log_tracker_config {path}: not valid TOML ({exc})"]) from exc
