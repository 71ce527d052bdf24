"""`lorakit tag`, `lorakit caption` and `lorakit dataset <tool>`: dataset preparation with sd-scripts' option names.

Numbers are read as text and converted here, so that every problem with the options (a missing folder, a
threshold that is negative or nan, an unknown model folder) is reported at once, before a model loads and before
any file is written.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Callable

from lorakit.errors import ConfigError, LorakitError

logger = logging.getLogger("lorakit.prep")


class Problems(list):
    """The problems found in one command line; `raise_if_any` raises them together as one ConfigError."""

    def number(self, value: str | None, option: str, kind: type = float, minimum: float | None = None,
               maximum: float | None = None) -> float | int | None:
        """`value` as `kind`, or None (and a problem recorded) when it is not a finite number in range."""
        if value is None:
            return None
        try:
            number = kind(value)
        except (TypeError, ValueError):
            self.append(f"{option} {value}: not {'an integer' if kind is int else 'a number'}")
            return None
        if not math.isfinite(number):
            self.append(f"{option} {value}: must be a finite number")
            return None
        if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
            limits = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            self.append(f"{option} {value}: must be {limits}")
            return None
        return number

    def folder(self, value: str | None, option: str) -> Path | None:
        if value is None:
            return None
        path = Path(value)
        if not path.is_dir():
            self.append(f"{option} {value}: no such folder")
            return None
        return path

    def output_file(self, value: str | None, option: str, suffixes: tuple[str, ...] = ()) -> Path | None:
        if value is None:
            return None
        path = Path(value)
        if not path.parent.is_dir():
            self.append(f"{option} {value}: the folder {path.parent} does not exist")
        if suffixes and path.suffix.lower() not in suffixes:
            self.append(f"{option} {value}: the file name must end in {' or '.join(suffixes)}")
        return path

    def require_module(self, module: str, why: str) -> None:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            self.append(f"{why}: install it with pip install 'lorakit[prep]' (or pip install {module})")

    def raise_if_any(self) -> None:
        if self:
            raise ConfigError(list(self))


def run_tool(name: str, handler: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run one command: argparse's own exits and user mistakes become exit statuses, as in `lorakit lora`."""
    if not logging.getLogger().handlers:  # run on its own (not through `lorakit`): show the tools' messages
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return handler(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    except LorakitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"lorakit {prog}", description=description)


def _add_loader_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch_size", default="1", help="images per model call (default 1)")
    p.add_argument("--max_data_loader_n_workers", default=None,
                   help="read and preprocess images in this many worker processes (default: in this process)")
    p.add_argument("--recursive", action="store_true", help="also take images from subfolders")
    p.add_argument("--debug", action="store_true", help="log each image's result")


def _add_caption_extension(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--caption_extension", default=default, help=f"extension of the caption files (default {default})")
    # sd-scripts' misspelt option, kept there for old command lines
    p.add_argument("--caption_extention", dest="caption_extension", help=argparse.SUPPRESS)


def _loader_numbers(args: argparse.Namespace, problems: Problems) -> tuple[int, int | None]:
    batch_size = problems.number(args.batch_size, "--batch_size", int, minimum=1) or 1
    workers = problems.number(args.max_data_loader_n_workers, "--max_data_loader_n_workers", int, minimum=0)
    return int(batch_size), workers


# ---------------------------------------------------------------------------------------------------------
# lorakit tag
# ---------------------------------------------------------------------------------------------------------

_THRESHOLD_OPTIONS = ("general", "character", "meta", "model", "copyright", "artist")


def build_tag_parser() -> argparse.ArgumentParser:
    from lorakit.prep.wd14 import DEFAULT_MODEL_DIR, DEFAULT_REPO_ID

    p = _parser("tag", "Tag images with a WD14 tagger (ONNX), as sd-scripts' tag_images_by_wd14_tagger.py.")
    p.add_argument("train_data_dir", help="folder of the images to tag")
    p.add_argument("--repo_id", default=DEFAULT_REPO_ID, help=f"tagger repository (default {DEFAULT_REPO_ID}); "
                   "owner/name/subfolder for taggers published with a tag_mapping.json")
    p.add_argument("--model_dir", default=DEFAULT_MODEL_DIR, help="where tagger models are kept: "
                   f"<model_dir>/<owner>_<name>/model.onnx and selected_tags.csv (default {DEFAULT_MODEL_DIR})")
    p.add_argument("--force_download", action="store_true", help="download the model files again (needs internet)")
    p.add_argument("--onnx", action="store_true", help="accepted for sd-scripts command lines; ONNX is the only backend")
    p.add_argument("--thresh", default="0.35", help="probability a tag needs (default 0.35)")
    for category in _THRESHOLD_OPTIONS:
        p.add_argument(f"--{category}_threshold", default=None,
                       help=f"probability a {category} tag needs (default --thresh; above 1 leaves them out)")
    _add_caption_extension(p, ".txt")
    p.add_argument("--caption_separator", default=", ", help='text between tags (default ", ")')
    p.add_argument("--remove_underscore", action="store_true", help="write tags with spaces instead of underscores")
    p.add_argument("--undesired_tags", default="", help="tags never written, separated like --caption_separator")
    p.add_argument("--always_first_tags", default=None, help="tags put first when present, e.g. 1girl,1boy")
    p.add_argument("--character_tags_first", action="store_true", help="character tags before the others")
    p.add_argument("--use_rating_tags", action="store_true", help="add the rating tag first")
    p.add_argument("--use_rating_tags_as_last_tag", action="store_true", help="add the rating tag last")
    p.add_argument("--use_quality_tags", action="store_true", help="add the quality tag first (models that have one)")
    p.add_argument("--use_quality_tags_as_last_tag", action="store_true", help="add the quality tag last")
    p.add_argument("--tag_replacement", default=None, help=r'replace tags: "source1,target1;source2,target2" (\, and \; escape)')
    p.add_argument("--character_tag_expand", action="store_true", help="chara_(series) becomes two tags: chara, series")
    p.add_argument("--append_tags", action="store_true", help="keep the tags already in each file and add the new ones")
    p.add_argument("--frequency_tags", action="store_true", help="print how often each tag was written")
    p.add_argument("--output_path", default=None, help="write one metadata file (.json or .jsonl) instead of caption files")
    _add_loader_options(p)
    return p


def _tag_thresholds(args: argparse.Namespace, problems: Problems) -> dict[str, float]:
    base = problems.number(args.thresh, "--thresh", minimum=0.0)
    thresholds = {}
    for category in _THRESHOLD_OPTIONS:
        given = getattr(args, f"{category}_threshold")
        value = problems.number(given, f"--{category}_threshold", minimum=0.0) if given is not None else base
        thresholds[category] = 0.35 if value is None else float(value)
    return thresholds


def _tag_files(args: argparse.Namespace, problems: Problems):
    from lorakit.prep.wd14 import hub_reachable, locate_model, missing_model_message

    files = locate_model(args.model_dir, args.repo_id)
    needs_download = bool(files.missing()) or args.force_download
    if needs_download and not hub_reachable():
        problems.append(missing_model_message(files) if files.missing() else
                        "--force_download: the hub is switched off (HF_HUB_OFFLINE) or huggingface_hub is missing")
    return files, needs_download


def parse_tag_args(argv: list[str]):
    """The checked request for `lorakit tag`, and whether the model must be downloaded first."""
    from lorakit.prep.tag_rules import TagOptions, parse_tag_replacement, split_tags
    from lorakit.prep.tagger import TagRequest

    args = build_tag_parser().parse_args(argv)
    problems = Problems()
    folder = problems.folder(args.train_data_dir, "train_data_dir")
    thresholds = _tag_thresholds(args, problems)
    batch_size, workers = _loader_numbers(args, problems)
    replacements: list[tuple[str, str]] = []
    if args.tag_replacement is not None:
        try:
            replacements = parse_tag_replacement(args.tag_replacement)
        except ValueError as err:
            problems.append(f"--tag_replacement: {err}")
    if not args.caption_separator:
        problems.append("--caption_separator must not be empty")
    output = problems.output_file(args.output_path, "--output_path", (".json", ".jsonl"))
    files, needs_download = _tag_files(args, problems)
    problems.require_module("onnxruntime", "lorakit tag runs taggers with onnxruntime")
    problems.raise_if_any()
    options = TagOptions(
        thresholds=thresholds, separator=args.caption_separator,
        undesired_tags=frozenset(split_tags(args.undesired_tags, args.caption_separator)),
        always_first_tags=tuple(split_tags(args.always_first_tags or "", args.caption_separator)),
        character_tags_first=args.character_tags_first, use_rating_tags=args.use_rating_tags,
        use_rating_tags_as_last_tag=args.use_rating_tags_as_last_tag, use_quality_tags=args.use_quality_tags,
        use_quality_tags_as_last_tag=args.use_quality_tags_as_last_tag,
    )
    request = TagRequest(
        train_data_dir=folder, files=files, options=options, caption_extension=args.caption_extension,
        remove_underscore=args.remove_underscore, character_tag_expand=args.character_tag_expand,
        tag_replacements=tuple(replacements), append_tags=args.append_tags, output_path=output,
        recursive=args.recursive, batch_size=batch_size, workers=workers, debug=args.debug,
    )
    return request, needs_download, args.frequency_tags


def _tag(argv: list[str]) -> int:
    from lorakit.prep.tagger import frequency_lines, run_tagging
    from lorakit.prep.wd14 import download_model

    request, needs_download, show_frequency = parse_tag_args(argv)
    if needs_download:
        download_model(request.files)
    report = run_tagging(request)
    if show_frequency:
        print("\n".join(frequency_lines(report.frequency)))
    where = request.output_path or f"{request.caption_extension} files"
    print(f"tagged {len(report.captions)} images -> {where}")
    return 0


def tag_main(argv: list[str]) -> int:
    return run_tool("tag", _tag, argv)
