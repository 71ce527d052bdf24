"""`lorakit lora <tool>`: resize, merge, extract, convert, inspect, split (dylora) and sample with LoRA files.

The options keep the names of sd-scripts' scripts (`networks/resize_lora.py`, `merge_lora.py`,
`svd_merge_lora.py`, `extract_lora_from_models.py`), so their command lines work with the script replaced by
`lorakit lora <tool>`. Every option is checked before a file is read, and every output is written to a
temporary name and moved into place, so a mistake never leaves a partial file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lorakit.cli.option_types import (
    OneLineErrorParser, dynamic_param_problems, finite_float, fraction, json_number_list, non_negative_float, positive_float,
    positive_int, recipe_text,
)
from lorakit.errors import ConfigError, LorakitError
from lorakit.families.base import ModelFamily
from lorakit.families.registry import detect_family, family_names, family_title, get_family

logger = logging.getLogger("lorakit.tools")

USAGE = """usage: lorakit lora <tool> [options]

tools:
  resize    change the rank of a LoRA by SVD (fixed or dynamic: sv_ratio, sv_fro, sv_cumulative)
  merge     merge LoRAs into a base model (--sd_model) or into one LoRA (--concat, --new_rank)
  extract   extract a LoRA from an original and a tuned model (--model_org, --model_tuned)
  convert   convert between the kohya and the diffusers/PEFT key layouts
  inspect   show a LoRA's algorithm, family, ranks, alphas, metadata and which loaders accept it
  sample    generate images with LoRAs merged into a base model, any family (same as `lorakit sample`)
  dylora    split a DyLoRA file into fixed-rank LoRAs (--new_rank r, or every multiple of --unit)

`lorakit lora <tool> --help` lists a tool's options.
"""

_PRECISION_CHOICES = ("float", "fp32", "fp16", "bf16")
PART_OPTIONS = ("clip_l", "t5xxl")  # model parts sd-scripts' merge tools take as files of their own


def main(argv: list[str]) -> int:
    """Run one LoRA tool; returns the exit status (2 for a user mistake, printed without a traceback)."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    tools = {"resize": _resize, "merge": _merge, "extract": _extract, "convert": _convert, "inspect": _inspect, "dylora": _dylora, "sample": _sample}
    tool, rest = argv[0], argv[1:]
    if not logging.getLogger().handlers:  # run on its own (not through `lorakit`): show the tools' messages
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    if tool not in tools:
        print(f"lorakit lora: unknown tool {tool!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return tools[tool](rest)
    except SystemExit as exc:  # argparse's own errors and --help
        return int(exc.code or 0)
    except LorakitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _parser(tool: str, description: str) -> argparse.ArgumentParser:
    return OneLineErrorParser(prog=f"lorakit lora {tool}", description=description)


# ---------------------------------------------------------------------------------------------------------
# resize
# ---------------------------------------------------------------------------------------------------------


def _resize(argv: list[str]) -> int:
    if _positional(argv):
        return _resize_recipe_form(argv)
    p = _parser("resize", "Change the rank of a LoRA by SVD (sd-scripts networks/resize_lora.py).")
    p.add_argument("--model", required=True, help="the LoRA to resize")
    p.add_argument("--save_to", required=True, help="output file (.safetensors, .ckpt, .pt, .pth)")
    p.add_argument("--new_rank", type=positive_int, default=None, help="rank (largest rank with --dynamic_method or --score_recipes); default 4")
    p.add_argument("--new_conv_rank", type=positive_int, default=None, help="rank for 3x3 convs; default --new_rank")
    p.add_argument("--dynamic_method", choices=("sv_ratio", "sv_fro", "sv_cumulative"), default=None)
    p.add_argument("--dynamic_param", type=positive_float, default=None, help="the dynamic method's parameter")
    p.add_argument("--save_precision", choices=_PRECISION_CHOICES, default=None, help="default float")
    p.add_argument("--device", default=None, help="where the SVDs run, e.g. cuda")
    p.add_argument("--verbose", action="store_true", help="print every module's new rank and retained norm")
    p.add_argument("--score_recipes", type=recipe_text, default=None, help="resize_lora recipe, e.g. fro_ckpt=1,thr=-3.55 (docs/tools.md, Recipes)")
    p.add_argument("--base_model", default=None, help="the model the LoRA applies to: for --score_recipes scored "
                   "against it, and for DoRA, OFT, LoHa, LoKr, ... files (their ΔW depends on it)")
    args = p.parse_args(argv)
    args.output_folder = None
    if args.score_recipes is not None:
        from lorakit.tools.recipe_cli import resize_by_recipe_command

        return resize_by_recipe_command(args)
    args.new_rank = 4 if args.new_rank is None else args.new_rank

    from lorakit.tools.common import check_output, parse_precision, require_file, save_lora
    from lorakit.tools.recipe_cli import read_for_resize
    from lorakit.tools.resize import resize_metadata, resize_modules

    problems = []
    if args.dynamic_method and args.dynamic_param is None:
        problems.append(f"--dynamic_method {args.dynamic_method} needs --dynamic_param")
    if args.dynamic_method and args.dynamic_param is not None:
        problems += dynamic_param_problems(args.dynamic_method, args.dynamic_param)
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        problems.append("--new_rank and --new_conv_rank must be at least 1")
    if problems:
        raise ConfigError(problems)
    save_to, fmt = check_output(args.save_to)
    save_dtype = parse_precision(args.save_precision, "--save_precision")
    require_file(args.model, "--model")
    if args.base_model:
        require_file(args.base_model, "--base_model")
    if args.verbose:
        logger.setLevel(logging.INFO)
    lora, found = read_for_resize(args, need_base=False)
    modules, report = resize_modules(
        found.modules, args.new_rank, new_conv_rank=args.new_conv_rank, dynamic_method=args.dynamic_method,
        dynamic_param=args.dynamic_param, device=args.device, verbose=args.verbose,
    )
    metadata = resize_metadata(lora.metadata, modules, report, dynamic_method=args.dynamic_method, dynamic_param=args.dynamic_param)
    save_lora(modules, save_to, fmt, metadata, save_dtype, found.passthrough)
    print(f"saved {save_to} ({len(modules)} modules, Frobenius norm kept {100 * report.mean_fro_retained():.1f}% on average)")
    return 0


def _positional(argv: list[str]) -> bool:
    """resize_lora.py's `CHECKPOINT LORA...` form: no --model, and a word that is no option's value."""
    if any(word == "--model" or word.startswith("--model=") for word in argv):
        return False
    takes_value = {"-o", "--output_folder", "-t", "--output_dtype", "-d", "--device", "-r", "--score_recipes"}
    return any(not word.startswith("-") and (i == 0 or argv[i - 1] not in takes_value) for i, word in enumerate(argv))


def _resize_recipe_form(argv: list[str]) -> int:
    """`resize_lora.py [-o FOLDER] [-r RECIPES] [-t 16|32] [-d DEVICE] [-v] CHECKPOINT LORA [LORA ...]`, the form of
    the resize_lora tool users' guides run (seed: `-o DIR -r fro_ckpt=1,thr=-3.55 model.safetensors lora.safetensors`):
    every LoRA resized by every recipe (`:`-separated), each output named after the LoRA, recipe and threshold."""
    from lorakit.tools.recipe_cli import resize_by_recipe_command

    p = _parser("resize", "Resize LoRAs by score recipes against their base model (resize_lora.py's command line).")
    p.add_argument("checkpoint_path", help="the base model the LoRAs apply to")
    p.add_argument("lora_model_paths", nargs="+", help="the LoRA files")
    p.add_argument("-o", "--output_folder", default=None, help="folder of the outputs (default: each LoRA's own)")
    p.add_argument("-t", "--output_dtype", choices=("16", "32"), default="16", help="16: fp16 (default), 32: float")
    p.add_argument("-d", "--device", default=None, help="where the SVDs run")
    p.add_argument("-r", "--score_recipes", default="fro_ckpt=1,thr=-3.5", help="recipes, ':'-separated")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v: per-run summary, -vv: every module")
    args = p.parse_args(argv)
    for recipe in filter(None, args.score_recipes.split(":")):
        recipe_text(recipe)
    for lora in args.lora_model_paths:
        for recipe in filter(None, args.score_recipes.split(":")):
            run = argparse.Namespace(
                model=lora, base_model=args.checkpoint_path, score_recipes=recipe, save_to=None,
                output_folder=args.output_folder, save_precision="fp16" if args.output_dtype == "16" else "float",
                new_rank=None, new_conv_rank=None, dynamic_method=None, device=args.device, verbose=args.verbose > 0,
            )
            resize_by_recipe_command(run)
    return 0


# ---------------------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------------------


def _merge(argv: list[str]) -> int:
    p = _parser("merge", "Merge LoRAs into a model (--sd_model) or into one LoRA (sd-scripts merge_lora.py, svd_merge_lora.py).")
    p.add_argument("--sd_model", default=None, help="base model (single file or diffusers folder) to merge into")
    p.add_argument("--save_to", required=True, help="output: a LoRA file, or a model file / diffusers folder with --sd_model")
    p.add_argument("--models", nargs="+", required=True, help="LoRA files, merged in order")
    p.add_argument("--ratios", nargs="+", type=finite_float, default=None, help="one ratio per LoRA (default 1.0 each)")
    p.add_argument("--precision", choices=_PRECISION_CHOICES, default="float", help="precision of the merge arithmetic")
    p.add_argument("--save_precision", choices=_PRECISION_CHOICES, default=None, help="default: as loaded")
    p.add_argument("--v2", action="store_true", help="the base model is SD 2.x")
    p.add_argument("--v_parameterization", action="store_true", default=None, help="SD 2.x v-prediction model (default: --v2)")
    p.add_argument("--concat", action="store_true", help="LoRA+LoRA: stack ranks (exact; output rank = sum of ranks)")
    p.add_argument("--shuffle", action="store_true", help="with --concat: permute the rank axis (ΔW unchanged)")
    p.add_argument("--new_rank", type=positive_int, default=None, help="LoRA+LoRA: SVD of the summed ΔW to this rank")
    p.add_argument("--new_conv_rank", type=positive_int, default=None, help="rank of 3x3 convs for the SVD merge")
    p.add_argument("--clamp_quantile", type=fraction, default=1.0, help="SVD merge: clip factors at this quantile (1 = off)")
    p.add_argument("--device", default=None, help="where the arithmetic runs, e.g. cuda")
    p.add_argument("--no_metadata", action="store_true", help="write only the minimal ss_* keys (LoRA output)")
    p.add_argument("--lbws", nargs="+", type=json_number_list, default=None, help='block weights, one JSON list per LoRA, e.g. "[1,0,1,...]" (17/26 SD 1.x/2.x, 12/20 SDXL)')
    _add_model_merge_options(p)
    args = p.parse_args(argv)

    from lorakit.tools.common import check_output, load_lora, parse_precision, require_file
    from lorakit.tools.merge import check_ratios

    ratios = check_ratios(args.models, args.ratios)
    parse_precision(args.save_precision, "--save_precision")
    for model in args.models:
        require_file(model, "--models")
    if args.sd_model is not None and args.flux_model is not None:
        raise ConfigError(["--sd_model and --flux_model: give one base model"])
    if args.sd_model is not None or args.flux_model is not None:
        if args.concat or args.new_rank:
            raise ConfigError(["--concat and --new_rank build a LoRA; they cannot be used with --sd_model/--flux_model"])
        return _merge_into_model(args, ratios)
    if args.concat and args.new_rank:
        raise ConfigError(["--concat and --new_rank are two different merges; choose one"])
    save_to, fmt = check_output(args.save_to)
    loras = [load_lora(model) for model in args.models]
    families = {lora.family.name for lora in loras}
    if len(families) > 1:
        raise ConfigError([f"--models: the LoRAs are for different model families ({', '.join(sorted(families))})"])
    return _merge_into_lora(args, ratios, _block_weighted(args, loras), save_to, fmt)


def _block_weighted(args: argparse.Namespace, loras: list) -> list:
    """The LoRAs with --lbws applied (unchanged without it)."""
    if not args.lbws:
        return loras
    from lorakit.tools.lbw import apply_block_weights, parse_lbws

    other = next((lora for lora in loras if lora.modules is None), None)
    if other is not None:
        raise ConfigError([f"--lbws: {other.path} is not a plain LoRA; block weights apply to LoRA factors only"])
    family = loras[0].family
    lists = parse_lbws(args.lbws, [lora.path for lora in loras], family)
    return [apply_block_weights(lora, lbw, family) for lora, lbw in zip(loras, lists)]


def _add_model_merge_options(p: argparse.ArgumentParser) -> None:
    """The options of sd-scripts' sdxl_merge_lora.py and flux_merge_lora.py for merging into a model."""
    p.add_argument("--family", choices=("auto", *family_names()), default="auto", help="base model family (default: detected)")
    p.add_argument("--sdxl", action="store_true", help="the base model is SDXL (detected anyway)")
    p.add_argument("--flux_model", default=None, help="FLUX: the BFL transformer file (or diffusers folder) to merge into")
    p.add_argument("--clip_l", default=None, help="FLUX: CLIP-L file, for LoRAs with lora_te1 modules")
    p.add_argument("--clip_l_save_to", default=None, help="FLUX: where the merged CLIP-L goes")
    p.add_argument("--t5xxl", default=None, help="FLUX: T5-XXL file, for LoRAs with lora_te3 modules")
    p.add_argument("--t5xxl_save_to", default=None, help="FLUX: where the merged T5-XXL goes")
    p.add_argument("--mem_eff_load_save", action="store_true", help="accepted; always on (the model is held once; FLUX files are written block by block)")
    p.add_argument("--diffusers", action="store_true", help="FLUX: the --flux_model file uses diffusers names; the output keeps them")
    p.add_argument("--loading_device", default="cpu", help="where the model is loaded (the CPU; accepted for sd-scripts)")
    p.add_argument("--working_device", default=None, help="where the arithmetic runs (as --device)")


def _model_family(args: argparse.Namespace) -> ModelFamily:
    """The base model's family: --family, else detected; the family flags (--sdxl) must agree with it. A
    --flux_model is a denoiser file whose text encoders come from files of their own."""
    path = args.flux_model if args.flux_model is not None else args.sd_model
    family = get_family(args.family if args.family != "auto" else detect_family(path))
    if args.flux_model is not None and not family.separate_parts:
        raise ConfigError([f"--flux_model {path}: a {family.title} model; --flux_model takes a model whose text encoders "
                           "come from files of their own (give this one as --sd_model)"])
    _check_family_flags(args, family, path)
    return family


def _check_family_flags(args: argparse.Namespace, family: ModelFamily, path: str) -> None:
    """sd-scripts' scripts take a flag per family (`--sdxl`); one given must name the model's family."""
    for name in family_names():
        if getattr(args, name, False) and family.name != name:
            raise ConfigError([f"--{name}: {path} is not a {family_title(name)} model (it reads as {family.name})"])


def _check_encoder_files(args: argparse.Namespace, family: ModelFamily, loras: list) -> None:
    """Parts in files of their own (text encoders): LoRA modules for them need the file and an output for it."""
    from lorakit.tools.common import require_file

    problems = []
    for option in PART_OPTIONS:
        given, save_to = getattr(args, option), getattr(args, f"{option}_save_to")
        part = family.separate_parts.get(option)
        if part is None:
            if given or save_to:
                problems.append(f"--{option}: {family.title} models do not take it from a file of its own")
            continue
        if given:
            require_file(given, f"--{option}")
        if given and not save_to:
            problems.append(f"--{option} {given}: also give --{option}_save_to, where the merged {part.what} is written")
        if save_to and not given:
            problems.append(f"--{option}_save_to: also give --{option}, the {part.what} to merge into")
        if save_to and not Path(save_to).parent.is_dir():
            problems.append(f"--{option}_save_to {save_to}: the folder {Path(save_to).parent} does not exist")
        user = next((f"{lora.path} (key {k})" for lora in loras for k in lora.tensors if k.startswith(part.lora_prefix + "_")), None)
        if user and not given and args.flux_model and not Path(args.flux_model).is_dir():
            problems.append(f"--{option}: {user} has {part.what} modules; pass --{option} and --{option}_save_to")
    if problems:
        raise ConfigError(problems)


def _merge_into_model(args: argparse.Namespace, ratios: list[float]) -> int:
    from lorakit.tools.common import load_lora, parse_precision, require_file
    from lorakit.tools.merge import merge_into_model
    from lorakit.tools.models import ModelOutput, check_model_output, load_base_model, save_base_model, save_part_files

    option, source = ("--flux_model", args.flux_model) if args.flux_model is not None else ("--sd_model", args.sd_model)
    require_file(source, option)
    family = _model_family(args)
    output = check_model_output(args.save_to, source, option, family=family)
    kind = "diffusers" if args.diffusers and output.kind != "folder" else output.kind
    if args.diffusers and "diffusers" not in family.single_file_kinds:
        raise ConfigError([f"--diffusers: {family.title} models have no single file under diffusers' names"])
    loras = _block_weighted(args, [load_lora(model, family.name, any_algorithm=True) for model in args.models])  # the files first: cheap to reject
    _check_encoder_files(args, family, loras)
    dtype = parse_precision(args.precision, "--precision")
    save_dtype = parse_precision(args.save_precision, "--save_precision")
    parts = {name: getattr(args, name) for name in family.separate_parts if getattr(args, name)}
    components = load_base_model(source, family=family, v2=args.v2, v_parameterization=args.v_parameterization,
                                 files=parts, dtype=dtype)
    changed = merge_into_model(components, family, loras, ratios, dtype=dtype, device=args.working_device or args.device)
    save_base_model(components, ModelOutput(output.path, kind), save_dtype, family)
    if output.kind != "folder":
        save_part_files(components, family, {name: getattr(args, f"{name}_save_to") for name in parts}, save_dtype)
    print(f"merged {len(loras)} LoRA(s) into {changed} layers; saved {output.path}")
    return 0


def _merge_into_lora(args, ratios, loras, save_to, fmt) -> int:
    from lorakit.tools.common import merged_metadata, parse_precision, save_lora
    from lorakit.tools.merge import merge_loras

    mode = "concat" if args.concat else ("svd" if args.new_rank else "same")
    modules = merge_loras(
        loras, ratios, mode=mode, new_rank=args.new_rank, new_conv_rank=args.new_conv_rank, shuffle=args.shuffle,
        clamp_quantile=args.clamp_quantile, device=args.device,
    )
    comment = "merged " + ", ".join(f"{Path(lora.path).name} x{ratio:g}" for lora, ratio in zip(loras, ratios)) + f" ({mode})"
    metadata = merged_metadata(
        loras, modules, title=save_to.stem, family=loras[0].family, extra={"ss_training_comment": comment},
        with_modelspec=not args.no_metadata,
    )
    save_lora(modules, save_to, fmt, metadata, parse_precision(args.save_precision, "--save_precision"))
    print(f"saved {save_to} ({len(modules)} modules, {mode} merge)")
    return 0


# ---------------------------------------------------------------------------------------------------------
# extract
# ---------------------------------------------------------------------------------------------------------


def _extract(argv: list[str]) -> int:
    p = _parser("extract", "Extract a LoRA from two models by SVD (sd-scripts networks/extract_lora_from_models.py).")
    p.add_argument("--model_org", required=True, help="the original model (single file or diffusers folder)")
    p.add_argument("--model_tuned", required=True, help="the fine-tuned model")
    p.add_argument("--save_to", required=True, help="output LoRA file")
    p.add_argument("--v2", action="store_true", help="the models are SD 2.x")
    p.add_argument("--v_parameterization", action="store_true", default=None, help="v-prediction (default: --v2)")
    p.add_argument("--sdxl", action="store_true", help="the models are SDXL (detected anyway)")
    p.add_argument("--flux", action="store_true", help="the models are FLUX transformers (detected anyway)")
    p.add_argument("--family", choices=("auto", *family_names()), default="auto", help="model family (default: detected)")
    p.add_argument("--dim", type=positive_int, default=4, help="rank of linears and 1x1 convs (default 4)")
    p.add_argument("--conv_dim", type=positive_int, default=None, help="rank of 3x3 convs; without it they are skipped")
    p.add_argument("--clamp_quantile", type=fraction, default=0.99, help="clip factors at this quantile (1 = off)")
    p.add_argument("--min_diff", type=non_negative_float, default=0.01, help="text encoder skipped when it moved by at most this")
    p.add_argument("--load_precision", choices=_PRECISION_CHOICES, default=None, help="precision the models load in")
    p.add_argument("--save_precision", choices=_PRECISION_CHOICES, default=None, help="default float")
    p.add_argument("--device", default=None, help="where the SVDs run, e.g. cuda")
    p.add_argument("--fast_svd", action="store_true",
                   help="randomized SVD: several times faster on a CPU, within ~0.1%% of the best rank-dim fit")
    p.add_argument("--no_metadata", action="store_true", help="write only the minimal ss_* keys")
    for accepted in ("--mem_eff_safe_open", "--load_original_model_to", "--load_tuned_model_to"):
        p.add_argument(accepted, nargs="?", const=True, default=None, help="accepted for sd-scripts; models load on the CPU")
    args = p.parse_args(argv)

    from lorakit.families.base import ModelSource
    from lorakit.tools.common import check_output, merged_metadata, parse_precision, require_file, save_lora
    from lorakit.tools.extract import ExtractOptions, extract_lora
    from lorakit.tools.models import load_base_model

    problems = [f"--{n} must be at least 1" for n in ("dim", "conv_dim") if getattr(args, n) is not None and getattr(args, n) < 1]
    if not 0.0 < args.clamp_quantile <= 1.0:
        problems.append(f"--clamp_quantile {args.clamp_quantile}: must be in (0, 1]")
    if problems:
        raise ConfigError(problems)
    save_to, fmt = check_output(args.save_to)
    save_dtype = parse_precision(args.save_precision, "--save_precision")
    load_dtype = parse_precision(args.load_precision, "--load_precision") or __import__("torch").float32
    require_file(args.model_org, "--model_org")
    require_file(args.model_tuned, "--model_tuned")
    family = _extract_family(args)
    v_param = args.v2 if args.v_parameterization is None else args.v_parameterization
    original = load_base_model(args.model_org, family=family, v2=args.v2, v_parameterization=v_param, dtype=load_dtype)
    tuned = load_base_model(args.model_tuned, family=family, v2=args.v2, v_parameterization=v_param, dtype=load_dtype)
    options = ExtractOptions(args.dim, args.conv_dim, args.clamp_quantile, args.min_diff, args.device, args.fast_svd)
    modules = extract_lora(original, tuned, family, options)
    version = family.version_of(ModelSource(args.model_org, v2=args.v2, v_parameterization=v_param), original)
    # the base model's variant goes with it (a schnell model makes a schnell LoRA: FLUX.1 files share one version)
    metadata = merged_metadata([], modules, title=save_to.stem, family=family, version=version, with_modelspec=not args.no_metadata,
                               variant=family.model_variant(original))
    save_lora(modules, save_to, fmt, metadata, save_dtype)
    print(f"saved {save_to} ({len(modules)} modules)")
    return 0


def _extract_family(args: argparse.Namespace) -> ModelFamily:
    """The models' family: --family, else detected from --model_org; a family flag (--sdxl) must agree with it."""
    name = args.family if args.family != "auto" else detect_family(args.model_org)
    family = get_family(name)
    _check_family_flags(args, family, args.model_org)
    tuned = detect_family(args.model_tuned) if args.family == "auto" else name
    if tuned != name:
        raise ConfigError([f"--model_tuned {args.model_tuned}: a {tuned} model, but --model_org is {name}"])
    return family


# ---------------------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------------------


def _convert(argv: list[str]) -> int:
    p = _parser("convert", "Convert a LoRA between the kohya and the diffusers/PEFT key layouts.")
    p.add_argument("--model", "--src_path", dest="model", default=None, help="input LoRA")
    p.add_argument("--save_to", "--dst_path", dest="save_to", required=True, help="output LoRA (or model file)")
    p.add_argument("--to", "--dst", dest="to", default=None, help="kohya (sd-scripts) or diffusers (peft)")
    p.add_argument("--src", default=None, help="the input's layout (kohya/sd-scripts or diffusers/peft/ai-toolkit); checked, the file says it anyway")
    p.add_argument("--keep_alpha", action="store_true", help="diffusers: write .alpha tensors instead of folding alpha/rank into lora_B")
    p.add_argument("--save_precision", choices=_PRECISION_CHOICES, default=None, help="default: as loaded")
    p.add_argument("--flux_diffusers_to_bfl", default=None, metavar="FOLDER",
                   help="instead of a LoRA: write a diffusers FLUX transformer folder as one BFL-layout file (sd-scripts convert_diffusers_to_flux.py)")
    args = p.parse_args(argv)

    if args.flux_diffusers_to_bfl is not None:
        return _denoiser_folder_to_file(args)
    from lorakit.adapters.formats import save_lora_file
    from lorakit.tools.common import check_output, load_lora, parse_precision, require_file, save_lora
    from lorakit.tools.convert import convert_to_diffusers, normalise_format, to_kohya_modules

    missing = [f"--{name}" for name in ("model", "to") if getattr(args, name) is None]
    if missing:
        raise ConfigError([f"{option} is required (or give --flux_diffusers_to_bfl)" for option in missing])
    target = normalise_format(args.to)
    if target is None:
        raise ConfigError([f"--to {args.to}: expected kohya (sd-scripts) or diffusers (peft)"])
    save_to, fmt = check_output(args.save_to)
    save_dtype = parse_precision(args.save_precision, "--save_precision")
    require_file(args.model, "--model")
    lora = load_lora(args.model)
    source = normalise_format(args.src) if args.src else None
    if args.src and source != ("kohya" if lora.style == "kohya" else "diffusers"):
        raise ConfigError([f"--src {args.src}: {args.model} is in the {lora.style} layout"])
    metadata = {k: v for k, v in lora.metadata.items() if not k.startswith("sshs_")}
    if target == "kohya":
        save_lora(to_kohya_modules(lora.modules), save_to, fmt, metadata, save_dtype)
    else:
        state, metadata = convert_to_diffusers(lora.modules, lora.family, metadata, keep_alpha=args.keep_alpha)
        save_lora_file(state, save_to, metadata, save_dtype=save_dtype, model_format=fmt)
    print(f"saved {save_to} ({len(lora.modules)} modules, {lora.style} -> {target})")
    return 0


def _denoiser_folder_to_file(args: argparse.Namespace) -> int:
    """A diffusers denoiser (a pipeline folder or its transformer/ folder) as one original-layout file: sd-scripts'
    convert_diffusers_to_flux.py, for a family whose single files hold the denoiser alone."""
    from lorakit.families.base import ModelSource
    from lorakit.tools.common import parse_precision
    from lorakit.tools.models import check_model_output, save_base_model

    if args.model or args.to:
        raise ConfigError(["--flux_diffusers_to_bfl converts a model; it takes no --model or --to"])
    source = args.flux_diffusers_to_bfl
    if not Path(source).is_dir():
        raise ConfigError([f"--flux_diffusers_to_bfl {source}: not a folder (give a diffusers FLUX folder)"])
    family = get_family(detect_family(source))
    if not family.separate_parts:
        raise ConfigError([f"--flux_diffusers_to_bfl {source}: a {family.title} folder; this option converts a model whose "
                           "single files hold the denoiser alone (FLUX.1)"])
    output = check_model_output(args.save_to, source, "--flux_diffusers_to_bfl", family=family)
    if output.kind != "safetensors":
        raise ConfigError([f"--save_to {args.save_to}: the file is written as .safetensors"])
    components = family.load_model(ModelSource(source, denoiser_only=True))
    save_base_model(components, output, parse_precision(args.save_precision, "--save_precision"), family)
    print(f"saved {output.path} ({family.title} {type(components.denoiser).__name__}, original layout)")
    return 0


# ---------------------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------------------


def _inspect(argv: list[str]) -> int:
    p = _parser("inspect", "Describe LoRA files (sd-scripts check_lora_weights.py / show_metadata.py).")
    p.add_argument("files", nargs="+", help="LoRA files")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--show_all_metadata", action="store_true", help="do not shorten long metadata values")
    args = p.parse_args(argv)

    from lorakit.adapters.formats import load_lora_file
    from lorakit.tools.inspect_lora import describe, format_report, report_json

    for path in args.files:
        tensors, metadata = load_lora_file(path)
        report = describe(tensors, metadata)
        print(report_json(report) if args.json else format_report(path, report, show_all_metadata=args.show_all_metadata))
    return 0


def _sample(argv: list[str]) -> int:
    from lorakit.cli.sample import main as sample_main

    return sample_main(argv)


# ---------------------------------------------------------------------------------------------------------
# dylora
# ---------------------------------------------------------------------------------------------------------


def _dylora(argv: list[str]) -> int:
    p = _parser("dylora", "Split a DyLoRA file into fixed-rank LoRAs (sd-scripts networks/extract_lora_from_dylora.py).")
    p.add_argument("--model", required=True, help="the DyLoRA file (networks.dylora)")
    p.add_argument("--save_to", required=True, help="output file; with --unit, NAME-0004.safetensors etc. next to it")
    p.add_argument("--new_rank", type=positive_int, default=None, help="write this one rank to --save_to")
    p.add_argument("--unit", type=positive_int, default=None, help="write every rank unit, 2·unit, … below the file's rank")
    p.add_argument("--save_precision", choices=_PRECISION_CHOICES, default=None, help="default: float")
    args = p.parse_args(argv)

    from lorakit.tools.recipe_cli import split_dylora_command

    return split_dylora_command(args)
