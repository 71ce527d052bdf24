"""Experiment logging through accelerate's trackers (TensorBoard, Weights & Biases), named as in sd-scripts."""

from __future__ import annotations

import importlib.util
import re
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


SECRETS = ("wandb_api_key", "huggingface_token")
#: paths that may reveal a user's folders; --log_config keeps only their last component, as sd-scripts drops them
PATH_OPTIONS = ("pretrained_model_name_or_path", "vae", "train_data_dir", "reg_data_dir", "output_dir", "logging_dir",
                "dataset_config", "config_file", "network_weights", "resume", "sample_prompts", "clip_l", "clip_g",
                "t5xxl", "ae", "in_json", "console_log_file", "tokenizer_cache_dir", "log_tracker_config",
                "conditioning_data_dir", "controlnet_model_name_or_path", "base_weights")
# an absolute path inside any other value (a POSIX path, ~/..., or a Windows drive path): kept as its last part
_ABSOLUTE_PATH = re.compile(r"(?:^|(?<=[\s='\",;\[(]))(?:~|[A-Za-z]:)?[/\\](?:[^\s,;'\"=/\\]+[/\\])*([^\s,;'\"=/\\]*)")


def tracker_config(cfg: Any) -> dict[str, Any] | None:
    """--log_config: the run's options as tracker hyper-parameters (`portable_options`); None (nothing logged)
    without --log_config, as in sd-scripts."""
    return portable_options(cfg) if cfg.log_config else None


def portable_options(cfg: Any) -> dict[str, Any]:
    """The run's options without secrets, with path options cut to their last component and no absolute path
    left in any other value: what may be logged or written into a file others may read."""
    config: dict[str, Any] = {}
    for key, value in cfg.model_dump().items():
        if key in SECRETS or value is None:
            continue
        if key in PATH_OPTIONS:
            value = [Path(v).name for v in value] if isinstance(value, list) else Path(str(value)).name
        value = value if isinstance(value, (int, float, str, bool)) else str(value)
        config[key] = _without_absolute_paths(value) if isinstance(value, str) else value
    return config


def _without_absolute_paths(text: str) -> str:
    return _ABSOLUTE_PATH.sub(lambda match: match.group(1), text)


def secret_warnings(cfg: Any) -> list[str]:
    """A secret typed on the command line ends up in the shell history and in process listings."""
    env = {"wandb_api_key": "WANDB_API_KEY", "huggingface_token": "HF_TOKEN"}
    return [f"--{name} is a secret; prefer the {env[name]} environment variable (never written to files or logs)"
            for name in SECRETS if getattr(cfg, name, None)]


def tracker_init_kwargs(cfg: Any) -> dict[str, Any]:
    """Per-tracker init arguments: --log_tracker_config's tables, plus --wandb_run_name."""
    kwargs = read_tracker_init_kwargs(cfg.log_tracker_config) if cfg.log_tracker_config else {}
    if cfg.wandb_run_name:
        kwargs.setdefault("wandb", {})["name"] = cfg.wandb_run_name
    return kwargs


def wandb_login(cfg: Any) -> None:
    if cfg.wandb_api_key and "wandb" in tracker_names(cfg):
        import wandb

        wandb.login(key=cfg.wandb_api_key)


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


def log_at_epoch(accelerator: Any, logs: dict[str, float], epoch: int, global_step: int) -> None:
    """Values of an epoch, as sd-scripts logs them: at step = the epoch number for TensorBoard (and other
    trackers), and for Weights & Biases (whose steps only go up) with `epoch` and `global_step` as values."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log({**logs, "epoch": epoch, "global_step": global_step})
        else:
            tracker.log(logs, step=epoch)
