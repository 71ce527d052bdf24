"""`lorakit model <tool>`: convert, merge and inspect whole base models.

The options keep the names of sd-scripts' tools (`tools/convert_diffusers20_original_sd.py`,
`tools/convert_diffusers_to_flux.py`, `tools/merge_sd3_safetensors.py`, `tools/merge_models.py`,
`tools/show_metadata.py`), so their command lines work with the script replaced by `lorakit model <tool>`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lorakit.cli.option_types import OneLineErrorParser, finite_float
from lorakit.errors import ConfigError, LorakitError
from lorakit.families.registry import family_names

log = logging.getLogger("lorakit.tools")

USAGE = """usage: lorakit model <tool> [options]

tools:
  convert   a diffusers folder to one original-layout file and back (SD 1.x/2.x, SDXL, SD3, FLUX.1), the
            precision changed with --save_precision; SD3 parts packed into one file (--dit --vae --clip_l ...)
  merge     the weighted sum of several checkpoints (--models, --ratios, --unet_only)
  inspect   a checkpoint's family, layout, dtypes, size and metadata

`lorakit model <tool> --help` lists a tool's options.
"""

PART_FILES = ("vae", "clip_l", "clip_g", "t5xxl", "ae")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    tools = {"convert": _convert, "merge": _merge, "inspect": _inspect}
    tool, rest = argv[0], argv[1:]
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    if tool not in tools:
        print(f"lorakit model: unknown tool {tool!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return tools[tool](rest)
    except SystemExit as exc:
        return int(exc.code or 0)
    except LorakitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------------------


def convert_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="lorakit model convert", description=(
        "Convert a base model between a diffusers folder and one original-layout file (a name with a suffix is "
        "a file, one without a folder)."))
    p.add_argument("model_to_load", nargs="?", default=None, help="the model: a single file or a diffusers folder")
    p.add_argument("model_to_save", nargs="?", default=None, help="the output: NAME.safetensors / NAME.ckpt, or a folder")
    p.add_argument("--diffusers_path", "--dit", "--model", dest="source", default=None,
                   help="the model (convert_diffusers_to_flux.py's --diffusers_path: a folder or its *-00001-of-*.safetensors; "
                        "merge_sd3_safetensors.py's --dit)")
    p.add_argument("--save_to", "--output", dest="output", default=None, help="the output (same as model_to_save)")
    p.add_argument("--family", choices=("auto", *family_names()), default="auto", help="default: detected")
    p.add_argument("--v1", action="store_true", help="an SD 1.x model (accepted; detected from the file)")
    p.add_argument("--v2", action="store_true", help="an SD 2.x model")
    p.add_argument("--v_parameterization", action="store_true", help="a v-prediction model (SD 2.x 768-v)")
    for name in PART_FILES:
        p.add_argument(f"--{name}", default=None, help=f"the {name} part from a file of its own (packed into the output)")
    p.add_argument("--without_text_encoders", action="store_true",
                   help="SD3: write the MMDiT and VAE alone (as sd3_medium.safetensors)")
    precision = p.add_argument_group("precision")
    precision.add_argument("--save_precision", "--save_precision_as", dest="save_precision", default=None,
                           help="float, fp16 or bf16 (FLUX also fp8, fp8_e4m3fn, fp8_e5m2); default: as stored")
    precision.add_argument("--fp16", action="store_const", const="fp16", dest="save_precision", help="same as --save_precision fp16")
    precision.add_argument("--bf16", action="store_const", const="bf16", dest="save_precision", help="same as --save_precision bf16")
    precision.add_argument("--float", action="store_const", const="float", dest="save_precision", help="same as --save_precision float")
    accepted = p.add_argument_group("sd-scripts options with nothing to do here")
    accepted.add_argument("--mem_eff_load_save", action="store_true", help="accepted: conversion always streams")
    accepted.add_argument("--use_safetensors", action="store_true", help="accepted: folders are always written as safetensors")
    accepted.add_argument("--device", default=None, help="accepted: conversion runs on the CPU")
    refused = p.add_argument_group("sd-scripts options not available (refused with a message)")
    for name in NOT_AVAILABLE:
        refused.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    return p


NOT_AVAILABLE = {
    "reference_model": "scheduler and tokenizer configs are written from the model itself",
    "variant": "a folder's weights are read as stored (give the folder of the variant's files)",
    "metadata": "converted files carry lorakit's architecture metadata only",
    "epoch": "converted files carry no epoch",
    "global_step": "converted files carry no step",
    "unet_use_linear_projection": "the U-Net is written with the configuration it was loaded with",
}


def _convert(argv: list[str]) -> int:
    from lorakit.tools.model_convert import ConvertOptions, convert_model

    args = convert_parser().parse_args(argv)
    problems = [f"--{name}: not available in lorakit model convert; {why}" for name, why in NOT_AVAILABLE.items()
                if getattr(args, name) is not None]
    source = args.source or args.model_to_load
    output = args.output or args.model_to_save
    if source is None:
        problems.append("the model to convert is needed (model_to_load, or --diffusers_path/--dit)")
    if output is None:
        problems.append("the output is needed (model_to_save, or --save_to/--output)")
    if args.v1 and args.v2:
        problems.append("--v1 and --v2: give one of them")
    if source is None or output is None:
        raise ConfigError(problems)
    options = ConvertOptions(
        source=_model_of_shard(source), output=output, family=args.family, v2=args.v2,
        v_parameterization=args.v_parameterization, save_precision=args.save_precision,
        files={name: getattr(args, name) for name in PART_FILES if getattr(args, name)},
        without_text_encoders=args.without_text_encoders, problems=problems,
    )
    print(f"wrote {convert_model(options)}")
    return 0


def _model_of_shard(path: str) -> str:
    """A diffusers weight shard (`…/transformer/diffusion_pytorch_model-00001-of-00003.safetensors`, as
    convert_diffusers_to_flux.py takes) stands for the model folder it is in."""
    file = Path(path)
    if file.is_file() and file.name.startswith("diffusion_pytorch_model") and (file.parent / "config.json").is_file():
        return str(file.parent)
    return path


# ---------------------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------------------


def merge_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="lorakit model merge", description=(
        "Merge single-file checkpoints into their weighted sum (sd-scripts tools/merge_models.py)."))
    p.add_argument("--models", nargs="+", required=True, help="the checkpoints (.safetensors) to merge")
    p.add_argument("--output", required=True, help="the merged .safetensors file")
    p.add_argument("--ratios", nargs="+", type=finite_float, default=None, help="one per model; default equal, summing to 1")
    p.add_argument("--unet_only", action="store_true", help="merge the denoiser only; the other weights come from the first model")
    p.add_argument("--device", default="cpu", help="where the sums are computed (default cpu)")
    p.add_argument("--precision", choices=("float", "fp16", "bf16"), default="float", help="precision of the sums")
    p.add_argument("--saving_precision", choices=("float", "fp16", "bf16"), default="float", help="precision written")
    p.add_argument("--show_skipped", action="store_true", help="list the keys of later models the first model lacks")
    p.add_argument("--family", choices=("auto", *family_names()), default="auto", help="for --unet_only; default: detected")
    return p


def _merge(argv: list[str]) -> int:
    from lorakit.tools.model_merge import MergeOptions, merge_models

    args = merge_parser().parse_args(argv)
    options = MergeOptions(args.models, args.output, args.ratios, args.unet_only, args.device, args.precision,
                           args.saving_precision, args.show_skipped, args.family)
    print(f"wrote {merge_models(options)}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------------------


def inspect_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="lorakit model inspect", description=(
        "Show a checkpoint's family, layout, dtypes, size and metadata (sd-scripts tools/show_metadata.py and more)."))
    p.add_argument("model_path", nargs="?", default=None, help="a single file or a diffusers folder")
    p.add_argument("--model", dest="model", default=None, help="same as model_path (show_metadata.py's option)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--metadata_only", action="store_true", help="print the metadata alone, as show_metadata.py does")
    return p


def _inspect(argv: list[str]) -> int:
    from lorakit.tools.model_inspect import inspect_model, render

    args = inspect_parser().parse_args(argv)
    path = args.model or args.model_path
    if path is None:
        raise ConfigError(["the checkpoint to inspect is needed (model_path or --model)"])
    report = inspect_model(path)
    print(render(report, as_json=args.json, metadata_only=args.metadata_only))
    return 0

