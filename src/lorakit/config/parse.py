"""The `train` command line: argparse built from the `TrainConfig` fields, plus `--config_file` TOML.

The parser is generated from the schema (bool -> store_true, list -> nargs="*", everything else a string
that pydantic converts), so the schema and the command line cannot drift apart. Only options actually
given are taken from the command line (argparse defaults are suppressed), which gives sd-scripts'
precedence: command line > config file > default.

Every problem (unknown options with a did-you-mean, unknown TOML keys, bad values, bad combinations,
options lorakit does not implement yet) is collected and raised as one ConfigError.
"""

from __future__ import annotations

import argparse
import functools
import types as pytypes
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic.fields import FieldInfo

from lorakit.config.rules import cross_field_warnings
from lorakit.config.rules_finetune import model_training_problems, model_training_warnings
from lorakit.config.schema_finetune import command_problems
from lorakit.config.schema import SECTIONS, TrainConfig, section_of
from lorakit.config.support import check_supported
from lorakit.config.toml_io import closest, read_config_file, write_config_file
from lorakit.config.validate import check_options
from lorakit.errors import ConfigError


class _ArgumentProblem(Exception):
    """Raised instead of argparse's print-and-exit, so the message joins the other problems."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise _ArgumentProblem(message.removeprefix("argument "))


def _flat_args(annotation: Any) -> list[Any]:
    """The members of a (possibly nested, possibly optional) union annotation."""
    if typing.get_origin(annotation) in (typing.Union, pytypes.UnionType):
        return [inner for arg in typing.get_args(annotation) for inner in _flat_args(arg)]
    return [annotation]


def _is_bool(info: FieldInfo) -> bool:
    return info.annotation is bool


def _is_list(info: FieldInfo) -> bool:
    return any(typing.get_origin(arg) is list for arg in _flat_args(info.annotation))


def _choices(info: FieldInfo) -> tuple[Any, ...]:
    for arg in _flat_args(info.annotation):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return ()


def _help(info: FieldInfo) -> str:
    default = info.get_default(call_default_factory=True)
    text = info.description or ""
    if default not in (None, False, ""):
        text += f" (default: {default})"
    return text.replace("%", "%%")  # argparse formats help strings with %


def _add_option(group: argparse._ArgumentGroup, name: str, info: FieldInfo) -> None:
    flag = f"--{name}"
    if _is_bool(info):
        group.add_argument(flag, action="store_true", help=_help(info))
    elif _is_list(info):
        group.add_argument(flag, nargs="*", metavar="VALUE", help=_help(info))
    else:
        choices = _choices(info)
        metavar = "{" + ",".join(str(c) for c in choices) + "}" if choices else name.upper()
        group.add_argument(flag, type=str, metavar=metavar, help=_help(info))


@functools.cache
def build_train_parser() -> argparse.ArgumentParser:
    """The argparse parser of `lorakit train`, one argument group per option section."""
    parser = _Parser(
        prog="lorakit train",
        usage="%(prog)s [--config_file FILE.toml] [--option VALUE ...]",
        description="Train a LoRA; accepts sd-scripts' training options and --config_file TOML files.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    fields = TrainConfig.model_fields
    for section in SECTIONS:
        group = parser.add_argument_group(section.SECTION.replace("_", " "))
        for name in section.model_fields:
            if section_of(name) == section.SECTION:  # an option two families share is listed once
                _add_option(group, name, fields[name])
    return parser


def _expand_abbreviations(argv: list[str], known: set[str]) -> tuple[list[str], list[str]]:
    """sd-scripts (argparse) accepts unique prefixes of option names; accept them too, with a warning."""
    expanded, warnings = [], []
    for token in argv:
        name, sep, value = token[2:].partition("=")
        if token.startswith("--") and name and name not in known:
            matches = [k for k in known if k.startswith(name)]
            if len(matches) == 1:
                warnings.append(f"--{name} is taken as --{matches[0]}; please write options in full")
                token = f"--{matches[0]}{sep}{value}"
        expanded.append(token)
    return expanded, warnings


def _unknown_arguments(extras: list[str], known: set[str]) -> list[str]:
    """Messages for the tokens argparse did not consume: unknown options and stray values."""
    problems: list[str] = []
    after_unknown_option = False
    for token in extras:
        if token.startswith("-") and len(token) > 1 and not _is_number(token):
            name = token.lstrip("-").partition("=")[0]
            candidates = sorted(k for k in known if k.startswith(name)) if name else []
            if len(candidates) > 1:
                hint = f" (ambiguous: {', '.join('--' + c for c in candidates[:5])})"
            else:
                near = closest(name, known)
                hint = f" (did you mean --{near}?)" if near else ""
            problems.append(f"unknown option {token.partition('=')[0]}{hint}")
            after_unknown_option = True
        elif not after_unknown_option:
            problems.append(f"unexpected argument {token!r} (options start with --)")
    return problems


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _family_problems(config: TrainConfig, warnings: list[str]) -> list[str]:
    """A given --family's own option rules, checked with the others (a detected family's are checked at start-up)."""
    from lorakit.families.checks import check_family_options
    from lorakit.families.registry import get_family

    checks = check_family_options(config, get_family(config.family))
    warnings += checks.warnings
    return checks.problems


@dataclass
class ParsedOptions:
    """The options as far as they could be read: `config` holds the valid ones (a bad value falls back to its
    default, so later checks can still run on it; None when even that fails), `problems` every problem found."""

    config: TrainConfig | None
    warnings: list[str]
    problems: list[str]


def parse_train_args(argv: list[str], *, check_support: bool = True, command: str = "train") -> tuple[TrainConfig, list[str]]:
    """Parse `lorakit train` options (or those of `lorakit <command>`: finetune, dreambooth, ...) and their
    --config_file into a TrainConfig.

    Returns the config and the warnings to show. Raises ConfigError listing every problem found.
    With --output_config the options are also written to the --config_file path (the caller should
    stop afterwards, as sd-scripts does). `check_support=False` skips the not-implemented-yet check.
    """
    parsed = read_train_args(argv, check_support=check_support, command=command)
    if parsed.problems or parsed.config is None:
        raise ConfigError(parsed.problems)
    return parsed.config, parsed.warnings


def read_train_args(argv: list[str], *, check_support: bool = True, command: str = "train") -> ParsedOptions:
    """Like `parse_train_args`, but return the problems with the config instead of raising, so that a run can
    report them together with the problems of its files, folders and data (`training.preflight`)."""
    known = set(TrainConfig.model_fields)
    argv, warnings = _expand_abbreviations(list(argv), known)
    try:
        namespace, extras = build_train_parser().parse_known_args(argv)
    except _ArgumentProblem as problem:
        return ParsedOptions(None, warnings, [f"--{str(problem).lstrip('-')}"])
    cli_values = vars(namespace)
    problems = _unknown_arguments(extras, known)

    writing = bool(cli_values.get("output_config"))
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    config_name = cli_values.get("config_file")
    # With --output_config the file is the destination, not a source.
    if config_name and not writing:
        from_file = read_config_file(config_name)
        problems += from_file.problems
        warnings += from_file.warnings
        values.update(from_file.values)
        origins.update(from_file.origins)
    values.update(cli_values)
    origins = {k: v for k, v in origins.items() if k not in cli_values}

    config, found = check_options(values, origins, skip_requirements=writing)
    problems += found
    if config is not None:
        config.for_command(command)
        problems += command_problems(config, command) + model_training_problems(config)
    if config is not None and check_support:
        unsupported, fallbacks = check_supported(config, command)
        problems += unsupported
        warnings += fallbacks
    if config is not None and config.family != "auto" and not writing:
        problems += _family_problems(config, warnings)
    if config is not None and not problems:
        warnings += cross_field_warnings(config) + model_training_warnings(config)
        if writing and config.config_file:
            write_config_file(config, config.config_file)
    return ParsedOptions(config, warnings, problems)
