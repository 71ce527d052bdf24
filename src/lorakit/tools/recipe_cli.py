"""The command bodies of `lorakit lora resize --score_recipes …` and `lorakit lora dylora …`.

`cli/lora.py` parses the options and calls these; they check every option before a file is read and write
through `save_lora` (temporary name, then rename, fresh hashes).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from lorakit.errors import CheckpointError, ConfigError

__all__ = ["resize_by_recipe_command", "split_dylora_command"]

logger = logging.getLogger("lorakit.tools")


def load_base_components(path: str, lora):
    """The base model a LoRA applies to, loaded for its weights (only what the family needs to list its layers)."""
    from lorakit.tools.models import load_base_model

    family = lora.family
    version = lora.metadata.get("ss_base_model_version") or None
    v2 = lora.metadata.get("ss_v2") == "True" or family.base_model(version).v2
    return load_base_model(path, family=family, v2=v2)


def read_for_resize(args: argparse.Namespace, need_base: bool):
    """(the LoRA, its `FileModules`) for a resize: plain files alone, others (and recipes scored against the
    model) with the base model."""
    from lorakit.tools.common import load_lora
    from lorakit.tools.file_modules import file_modules

    lora = load_lora(args.model, any_algorithm=True)
    components = None
    if args.base_model and (need_base or lora.modules is None):
        components = load_base_components(args.base_model, lora)
    return lora, file_modules(args.model, lora.family, lora.tensors, lora.modules, components)


def resize_by_recipe_command(args: argparse.Namespace) -> int:
    """Resize by a score recipe; `args.new_rank`, when given, caps every module's rank."""
    from lorakit.tools.common import check_output, parse_precision, require_file, save_lora
    from lorakit.tools.resize import resize_metadata
    from lorakit.tools.resize_recipe import parse_recipe, resize_by_recipe

    recipe = parse_recipe(args.score_recipes)
    problems = []
    if args.dynamic_method:
        problems.append(f"--dynamic_method {args.dynamic_method} and --score_recipes are two ways to choose ranks; give one")
    if recipe.needs_base and not args.base_model:
        problems.append(f"--score_recipes {recipe.text}: fro_ckpt, spn_ckpt and subspace need --base_model (the model the LoRA applies to)")
    if args.new_rank is not None and args.new_rank < 1:
        problems.append("--new_rank must be at least 1")
    if args.new_conv_rank is not None:
        problems.append("--new_conv_rank: with --score_recipes the recipe chooses every rank (--new_rank caps them all)")
    if problems:
        raise ConfigError(problems)
    if args.save_to is None:  # resize_lora.py's form: -o FOLDER (default: the LoRA's own folder)
        folder = Path(args.output_folder or Path(args.model).parent)
        if not folder.is_dir():
            raise ConfigError([f"-o {folder}: no such folder"])
        save_to, fmt = None, "safetensors"
    else:
        save_to, fmt = check_output(args.save_to)
    save_dtype = parse_precision(args.save_precision, "--save_precision")
    require_file(args.model, "--model")
    if args.base_model:
        require_file(args.base_model, "--base_model")
    if args.verbose:
        logger.setLevel(logging.INFO)
    lora, found = read_for_resize(args, recipe.needs_base)
    element_size = torch.empty((), dtype=save_dtype or torch.float32).element_size()
    missing = [name for name in found.modules if recipe.needs_base and name not in found.weights]
    if missing:
        raise CheckpointError(f"--base_model {args.base_model} has no layer for key {missing[0]} of {args.model}")
    modules, report, threshold = resize_by_recipe(found.modules, recipe, found.weights if recipe.needs_base else None,
                                                  max_rank=args.new_rank, element_size=element_size)
    if not modules:
        raise ConfigError([f"--score_recipes {recipe.text}: no module keeps any rank (threshold {threshold:.3f}); nothing to save"])
    metadata = resize_metadata(lora.metadata, modules, report, dynamic_method="score_recipes", dynamic_param=recipe.text)
    metadata["ss_training_comment"] = f"threshold {threshold:.3f}; " + metadata["ss_training_comment"]
    if save_to is None:  # resize_lora.py's form: a name made of the LoRA's, the recipe's and the threshold
        save_to = recipe_output_path(args, recipe, threshold)
    save_lora(modules, save_to, fmt, metadata, save_dtype, found.passthrough)
    removed = sum(1 for _, new in report.ranks.values() if new == 0)
    print(
        f"saved {save_to} ({len(modules)} modules, {removed} left out, threshold {threshold:.3f}, "
        f"Frobenius norm kept {100 * report.mean_fro_retained():.1f}% on average)"
    )
    return 0


def recipe_output_path(args: argparse.Namespace, recipe, threshold: float) -> Path:
    """resize_lora.py's output name: `<lora>_<score keys and weights>[_scale…][_size…]_th<threshold>.safetensors`
    in -o's folder (the LoRA's own without -o)."""
    def number(value: float) -> str:
        return f"{value:.2f}".rstrip("0").rstrip(".")

    parts = [f"{key.replace('_', '')}{number(weight)}" for key, weight in sorted(recipe.weights.items()) if weight]
    if recipe.rescale != 1.0:
        parts.append(f"scale{number(recipe.rescale)}")
    if recipe.size_mib is not None:
        parts.append(f"size{number(recipe.size_mib)}")
    folder = Path(args.output_folder or Path(args.model).parent)
    return folder / f"{Path(args.model).stem}_{'_'.join(parts)}_th{number(threshold)}.safetensors"


def split_dylora_command(args: argparse.Namespace) -> int:
    """One rank (`--new_rank`) to `--save_to`, or sd-scripts' every multiple of `--unit` to NAME-0004 etc."""
    from lorakit.tools.common import check_output, load_lora, parse_precision, require_file, save_lora
    from lorakit.tools.dylora_split import check_rank, dylora_unit, max_rank, split_metadata, split_outputs, split_ranks, truncate_modules

    if (args.new_rank is None) == (args.unit is None):
        raise ConfigError(["give --new_rank (one file at that rank) or --unit (every multiple of it), not both"])
    if args.unit is not None and args.unit < 1:
        raise ConfigError([f"--unit {args.unit}: must be at least 1"])
    save_to, fmt = check_output(args.save_to)
    save_dtype = parse_precision(args.save_precision, "--save_precision")
    require_file(args.model, "--model")
    lora = load_lora(args.model)
    unit = dylora_unit(lora.metadata, args.model)
    file_rank = max_rank(lora.modules)
    if args.new_rank is not None:
        check_rank(args.new_rank, file_rank, unit, args.model)
        outputs = [(args.new_rank, save_to)]
    else:
        if unit and args.unit % unit:
            raise ConfigError([f"--unit {args.unit}: {args.model} was trained with unit={unit}; use a multiple of it"])
        outputs = split_outputs(save_to, split_ranks(file_rank, args.unit))
        if not outputs:
            raise ConfigError([f"--unit {args.unit}: {args.model} has rank {file_rank}; no smaller multiple of the unit to write"])
    for rank, path in outputs:
        modules = truncate_modules(lora.modules, rank)
        save_lora(modules, path, fmt, split_metadata(lora.metadata, file_rank, rank), save_dtype)
        print(f"saved {path} (rank {rank} of {file_rank}, {len(modules)} modules)")
    return 0
