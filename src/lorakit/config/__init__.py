"""Typed options of `lorakit train` (sd-scripts' names and defaults) and the command-line/TOML parser."""

from __future__ import annotations

from lorakit.config.parse import ParsedOptions, build_train_parser, parse_train_args, read_train_args
from lorakit.config.schema import TrainConfig
from lorakit.config.support import check_supported
from lorakit.config.validate import build_config

__all__ = [
    "ParsedOptions", "TrainConfig", "build_config", "build_train_parser", "check_supported", "parse_train_args",
    "read_train_args",
]
