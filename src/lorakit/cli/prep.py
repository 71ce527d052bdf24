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
            limits = f"at least {minimum:g}" if maximum is None else f"between {minimum:g} and {maximum:g}"
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


def run_tool(handler: Callable[[list[str]], int], argv: list[str]) -> int:
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
    return run_tool(_tag, argv)


# ---------------------------------------------------------------------------------------------------------
# lorakit caption
# ---------------------------------------------------------------------------------------------------------


def build_caption_parser() -> argparse.ArgumentParser:
    from lorakit.prep.caption_models import MODEL_TYPES

    p = _parser("caption", "Caption images with BLIP, GIT or Qwen2(.5)-VL from a local transformers model folder "
                "(sd-scripts' make_captions.py and make_captions_by_git.py).")
    p.add_argument("train_data_dir", help="folder of the images to caption")
    p.add_argument("--model_type", choices=MODEL_TYPES, default=None,
                   help="the captioner (default: the model_type in the folder's config.json; blip without a folder)")
    p.add_argument("--caption_weights", default=None, help="BLIP: the transformers model folder (or hub id)")
    p.add_argument("--model_id", default=None, help="GIT or Qwen-VL: the transformers model folder (or hub id)")
    p.add_argument("--prompt", default=None, help="Qwen-VL: the instruction; BLIP: the caption's start, cut off "
                   "afterwards (default 'a picture of ', as the original BLIP decoder)")
    p.add_argument("--beam_search", action="store_true", help="beam search (default: nucleus sampling for BLIP, "
                   "greedy for GIT and Qwen-VL)")
    p.add_argument("--num_beams", default="1", help="beams for --beam_search (default 1)")
    p.add_argument("--top_p", default="0.9", help="BLIP nucleus sampling's top_p (default 0.9)")
    p.add_argument("--max_length", default=None, help="longest caption in tokens (default 75 BLIP, 50 GIT, "
                   "256 new tokens Qwen-VL)")
    p.add_argument("--min_length", default=None, help="shortest caption in tokens (default 5 BLIP)")
    p.add_argument("--seed", default="42", help="seed for sampling (default 42)")
    p.add_argument("--remove_words", action="store_true", help="drop phrases like 'with the words ...' that "
                   "describe text in the image")
    p.add_argument("--overwrite", action="store_true", help="replace existing caption files (default: keep them)")
    _add_caption_extension(p, ".caption")
    _add_loader_options(p)
    return p


def _caption_model(args: argparse.Namespace, problems: Problems) -> tuple[str | None, Path | None, str | None]:
    """(model type, local folder, hub id to download): from the options and the folder's config.json."""
    from lorakit.prep.caption_models import DEFAULT_MODELS, MODEL_TYPES, folder_model_type
    from lorakit.prep.wd14 import hub_reachable

    if args.caption_weights and args.model_id and args.caption_weights != args.model_id:
        problems.append("--caption_weights and --model_id both name a model; give one")
    option = "--caption_weights" if args.caption_weights else "--model_id"
    source = args.caption_weights or args.model_id or DEFAULT_MODELS[args.model_type or "blip"]
    folder = Path(source)
    if folder.is_dir():
        found = folder_model_type(folder)
        if found is None:
            problems.append(f"{option} {source}: no config.json there; give a transformers model folder")
        elif found not in MODEL_TYPES:
            problems.append(f"{option} {source}: model_type {found!r} is not a captioner lorakit runs "
                            f"({', '.join(MODEL_TYPES)})")
        elif args.model_type and args.model_type != found:
            problems.append(f"--model_type {args.model_type}: {source} holds a {found} model")
        return found, folder, None
    if source.startswith(("http://", "https://")) or folder.suffix in (".pth", ".pt", ".ckpt"):
        problems.append(f"{option} {source}: original BLIP checkpoints are not read; give a transformers BLIP "
                        f"folder such as one downloaded from {DEFAULT_MODELS['blip']}")
    elif source.count("/") == 1 and not folder.exists() and hub_reachable():
        return args.model_type, None, source
    else:
        problems.append(f"{option} {source}: no such model folder; put the transformers model there (config.json, "
                        "weights, tokenizer and preprocessor files, e.g. downloaded from "
                        f"{DEFAULT_MODELS[args.model_type or 'blip']}), or run with internet access")
    return args.model_type, None, None


def _caption_settings(args: argparse.Namespace, model_type: str | None, problems: Problems):
    from lorakit.prep.caption_models import CaptionSettings

    kind = model_type or "blip"
    settings = CaptionSettings(
        model_type=kind, beam_search=args.beam_search, prompt=args.prompt,
        max_length=problems.number(args.max_length, "--max_length", int, minimum=1),
        min_length=problems.number(args.min_length, "--min_length", int, minimum=0),
        num_beams=int(problems.number(args.num_beams, "--num_beams", int, minimum=1) or 1),
        top_p=float(problems.number(args.top_p, "--top_p", minimum=0.0, maximum=1.0) or 0.9),
    )
    limits = list(settings.length_limits().values())
    if kind in ("blip", "git") and len(limits) == 2 and limits[1] > limits[0]:
        problems.append(f"--min_length {limits[1]} is more than --max_length {limits[0]}")
    if args.prompt is not None and kind == "git":
        problems.append("--prompt: GIT captions an image without a prompt (use blip or a Qwen-VL model)")
    return settings


def parse_caption_args(argv: list[str]):
    """The checked request for `lorakit caption`, and the hub id to download first (None for a local folder)."""
    from lorakit.prep.captioner import CaptionRequest

    args = build_caption_parser().parse_args(argv)
    problems = Problems()
    folder = problems.folder(args.train_data_dir, "train_data_dir")
    model_type, model_folder, hub_id = _caption_model(args, problems)
    settings = _caption_settings(args, model_type, problems)
    batch_size, workers = _loader_numbers(args, problems)
    seed = problems.number(args.seed, "--seed", int, minimum=0)
    problems.raise_if_any()
    request = CaptionRequest(
        train_data_dir=folder, model_folder=model_folder, settings=settings, caption_extension=args.caption_extension,
        recursive=args.recursive, overwrite=args.overwrite, remove_words=args.remove_words, seed=int(seed),
        batch_size=batch_size, workers=workers, debug=args.debug,
    )
    return request, hub_id


def _downloaded(request, hub_id: str):
    """Fetch a hub model (users with internet access), then take its type from its config.json."""
    import dataclasses

    from huggingface_hub import snapshot_download

    from lorakit.errors import DataError
    from lorakit.prep.caption_models import MODEL_TYPES, folder_model_type

    try:
        folder = Path(snapshot_download(hub_id))
    except Exception as err:  # noqa: BLE001 - any network or hub failure ends in the same advice
        raise DataError(f"downloading {hub_id} failed ({err.__class__.__name__}: {err}); give a local model folder") from None
    found = folder_model_type(folder)
    if found not in MODEL_TYPES:
        raise DataError(f"{hub_id}: model_type {found!r} is not a captioner lorakit runs ({', '.join(MODEL_TYPES)})")
    settings = dataclasses.replace(request.settings, model_type=found)
    return dataclasses.replace(request, model_folder=folder, settings=settings)


def _caption(argv: list[str]) -> int:
    from lorakit.prep.captioner import images_to_caption, run_captioning

    request, hub_id = parse_caption_args(argv)
    images, kept = images_to_caption(request)
    if kept:
        print(f"kept {kept} existing {request.caption_extension} files (--overwrite replaces them)")
    if not images:
        print("no images to caption")
        return 0
    if hub_id:
        request = _downloaded(request, hub_id)
    written = run_captioning(request, images)
    print(f"captioned {len(written)} images -> {request.caption_extension} files")
    return 0


def caption_main(argv: list[str]) -> int:
    return run_tool(_caption, argv)


# ---------------------------------------------------------------------------------------------------------
# lorakit dataset <tool>
# ---------------------------------------------------------------------------------------------------------

DATASET_USAGE = """usage: lorakit dataset <tool> [options]

tools (sd-scripts' script in brackets):
  merge-captions  caption files -> metadata JSON key "caption" (finetune/merge_captions_to_metadata.py)
  merge-tags      tag files -> metadata JSON key "tags" (finetune/merge_dd_tags_to_metadata.py)
  clean           clean the captions and tags of a metadata JSON (finetune/clean_captions_and_tags.py)
  resize          resized copies of a folder's images for several pixel budgets (tools/resize_images_to_resolution.py)
  canny           Canny edge images for ControlNet conditioning (tools/canny.py)

The metadata files are what `lorakit train --in_json` reads. `lorakit dataset <tool> --help` lists a tool's options.
"""


def _merge_parser(tool: str, key: str, default_extension: str) -> argparse.ArgumentParser:
    p = _parser(f"dataset {tool}", f"Put each image's {default_extension} file into the metadata JSON under "
                f'"{key}" (for lorakit train --in_json).')
    p.add_argument("train_data_dir", help="folder of the images")
    p.add_argument("out_json", help="metadata file to write (updated when it exists and --in_json is not given)")
    p.add_argument("--in_json", default=None, help="metadata file to start from")
    _add_caption_extension(p, default_extension)
    p.add_argument("--full_path", action="store_true", help="key the entries by absolute image path (default: by "
                   "file name without extension, found in the subset's image folder)")
    p.add_argument("--recursive", action="store_true", help="also take images from subfolders (needs --full_path)")
    p.add_argument("--debug", action="store_true", help="accepted for sd-scripts command lines")
    return p


def _merge(tool: str, key: str, default_extension: str, argv: list[str]) -> int:
    from lorakit.prep.metadata_tools import merge_text_files

    args = _merge_parser(tool, key, default_extension).parse_args(argv)
    problems = Problems()
    folder = problems.folder(args.train_data_dir, "train_data_dir")
    out_json = problems.output_file(args.out_json, "out_json", (".json",))
    if args.in_json is not None and not Path(args.in_json).is_file():
        problems.append(f"--in_json {args.in_json}: no such file")
    if args.recursive and not args.full_path:
        problems.append("--recursive needs --full_path: names in subfolders may repeat")
    problems.raise_if_any()
    report = merge_text_files(folder, out_json, key, args.caption_extension, Path(args.in_json) if args.in_json else None,
                              full_path=args.full_path, recursive=args.recursive)
    print(f"wrote {out_json}: {key} of {report.merged} images")
    return 0


def _clean(argv: list[str]) -> int:
    from lorakit.prep.metadata_tools import clean_metadata

    p = _parser("dataset clean", "Clean the tags and captions of a metadata JSON (sd-scripts' clean_captions_and_tags.py).")
    p.add_argument("files", nargs="+", metavar="in_json out_json", help="metadata file to read, file to write")
    p.add_argument("--debug", action="store_true", help="accepted for sd-scripts command lines")
    args = p.parse_args(argv)
    files = list(args.files)
    if len(files) == 3:  # sd-scripts' old form: train_data_dir in_json out_json
        logger.warning("train_data_dir is not needed any more; every entry of %s is cleaned", files[1])
        files = files[1:]
    problems = Problems()
    if len(files) != 2:
        problems.append(f"give in_json and out_json ({len(files)} file names given)")
        problems.raise_if_any()
    in_json, out_json = Path(files[0]), problems.output_file(files[1], "out_json", (".json",))
    if not in_json.is_file():
        problems.append(f"in_json {in_json}: no such file")
    problems.raise_if_any()
    tags, captions = clean_metadata(in_json, out_json)
    print(f"wrote {out_json}: {tags} tag lists and {captions} captions changed")
    return 0


def _resize(argv: list[str]) -> int:
    from lorakit.prep.resize import INTERPOLATIONS, parse_resolutions, resize_folder

    p = _parser("dataset resize", "Resized copies of a folder's images (sd-scripts' resize_images_to_resolution.py).")
    p.add_argument("src_img_folder", help="folder of the images")
    p.add_argument("dst_img_folder", help="folder for the copies (created if needed)")
    p.add_argument("--max_resolution", default="512x512,384x384,256x256,128x128",
                   help='pixel budgets, "WxH,WxH,..." (default 512x512,384x384,256x256,128x128)')
    p.add_argument("--divisible_by", default="1", help="crop both sides to a multiple of this (default 1)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default=None,
                   help="resampling filter (default: area when shrinking)")
    p.add_argument("--save_as_png", action="store_true", help="save PNG instead of JPEG (quality 100)")
    p.add_argument("--copy_associated_files", action="store_true",
                   help="copy each image's caption and other same-named files beside each copy")
    args = p.parse_args(argv)
    problems = Problems()
    src = problems.folder(args.src_img_folder, "src_img_folder")
    divisible_by = problems.number(args.divisible_by, "--divisible_by", int, minimum=1)
    resolutions = []
    try:
        resolutions = parse_resolutions(args.max_resolution)
    except ValueError as err:
        problems.append(f"--max_resolution: {err}")
    dst = Path(args.dst_img_folder)
    if src is not None and dst.resolve() == src.resolve():
        problems.append("dst_img_folder must differ from src_img_folder")
    if dst.exists() and not dst.is_dir():
        problems.append(f"dst_img_folder {dst}: exists and is not a folder")
    problems.raise_if_any()
    report = resize_folder(src, dst, resolutions, int(divisible_by), args.interpolation, args.save_as_png,
                           args.copy_associated_files)
    print(f"wrote {report.written} resized copies of {report.images} images and copied {report.copied} files to {dst}")
    return 0


def _canny(argv: list[str]) -> int:
    p = _parser("dataset canny", "Canny edge images, 255 on edges (sd-scripts' tools/canny.py; OpenCV's algorithm).")
    p.add_argument("input", nargs="?", help="an image, or a folder of images")
    p.add_argument("output", nargs="?", help="the edge image, or a folder for them (PNG, named as the images)")
    p.add_argument("--input", dest="input_option", default=None, help=argparse.SUPPRESS)
    p.add_argument("--output", dest="output_option", default=None, help=argparse.SUPPRESS)
    p.add_argument("--low_threshold", "--thres1", dest="low", default="32", help="hysteresis low threshold (default 32)")
    p.add_argument("--high_threshold", "--thres2", dest="high", default="224", help="high threshold (default 224)")
    p.add_argument("--recursive", action="store_true", help="with a folder: also its subfolders")
    args = p.parse_args(argv)
    source, target = args.input or args.input_option, args.output or args.output_option
    problems = Problems()
    low = problems.number(args.low, "--low_threshold", minimum=0.0)
    high = problems.number(args.high, "--high_threshold", minimum=0.0)
    if low is not None and high is not None and low > high:
        problems.append(f"--low_threshold {args.low} is above --high_threshold {args.high}")
    if source is None or target is None:
        problems.append("give the input image (or folder) and the output")
    elif not Path(source).exists():
        problems.append(f"input {source}: no such file or folder")
    elif Path(source).is_file() and not Path(target).parent.is_dir():
        problems.append(f"output {target}: the folder {Path(target).parent} does not exist")
    problems.raise_if_any()
    from lorakit.prep.canny import edge_images

    count = edge_images(Path(source), Path(target), float(low), float(high), args.recursive)
    print(f"wrote {count} edge image{'s' if count != 1 else ''} to {target}")
    return 0


def _dataset(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(DATASET_USAGE)
        return 0
    tools = {
        "merge-captions": lambda rest: _merge("merge-captions", "caption", ".caption", rest),
        "merge-tags": lambda rest: _merge("merge-tags", "tags", ".txt", rest),
        "clean": _clean, "resize": _resize, "canny": _canny,
    }
    tool = argv[0].replace("_", "-")
    if tool not in tools:
        print(f"lorakit dataset: unknown tool {argv[0]!r}\n\n{DATASET_USAGE}", file=sys.stderr)
        return 2
    return tools[tool](argv[1:])


def dataset_main(argv: list[str]) -> int:
    return run_tool(_dataset, argv)
