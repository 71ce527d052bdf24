"""`lorakit model merge`: the weighted sum of single-file checkpoints (sd-scripts' `tools/merge_models.py`).

Each merged tensor is `Σ ratio_i · W_i`, computed in `--precision` in the models' order, exactly as sd-scripts
sums it; keys of later models the first lacks are skipped (`--show_skipped` lists them), keys a later model
lacks take the first model's value at that model's ratio. With `--unet_only` only the denoiser's keys (the
family's `single_file_denoiser_prefixes`) are summed; everything else is the first model's. Integer tensors
(position ids) are the first model's, unchanged. The first model is read into the sum and the others are
read one tensor at a time, so the peak is about one model; the result is written one tensor at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from lorakit.checkpoint_io import write_safetensors_atomic
from lorakit.errors import ConfigError
from lorakit.families.base import ModelFamily
from lorakit.families.registry import detect_family, get_family

log = logging.getLogger("lorakit.tools")
DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class MergeOptions:
    models: list[str]
    output: str
    ratios: list[float] | None = None
    unet_only: bool = False
    device: str = "cpu"
    precision: str = "float"
    saving_precision: str = "float"
    show_skipped: bool = False
    family: str = "auto"


def check_merge(options: MergeOptions) -> tuple[Path, ModelFamily]:
    """Every problem at once, before a tensor is read."""
    problems = []
    if len(options.models) < 2:
        problems.append("--models: give at least two checkpoints to merge")
    for model in options.models:
        if not model.endswith(".safetensors"):
            problems.append(f"--models {model}: only .safetensors checkpoints are merged (convert others first)")
        elif not Path(model).is_file():
            problems.append(f"--models {model}: file not found")
    if options.ratios is not None and len(options.ratios) != len(options.models):
        problems.append(f"--ratios: {len(options.ratios)} values for {len(options.models)} models (one per model)")
    output = Path(options.output if options.output.endswith(".safetensors") else options.output + ".safetensors")
    if any(output.resolve() == Path(m).resolve() for m in options.models):
        problems.append(f"--output {output}: refusing to overwrite one of the --models")
    if not output.parent.is_dir():
        problems.append(f"--output {output}: the folder {output.parent} does not exist")
    if problems:
        raise ConfigError(problems)
    names = [options.family] if options.family != "auto" else [detect_family(m) for m in options.models]
    if len(set(names)) > 1:
        raise ConfigError([f"--models: the checkpoints are of different families ({', '.join(f'{m}: {n}' for m, n in zip(options.models, names))})"])
    return output, get_family(names[0])


def merge_models(options: MergeOptions) -> Path:
    """Merge and write; returns the output path."""
    output, family = check_merge(options)
    dtype, save_dtype = DTYPES[options.precision], DTYPES[options.saving_precision]
    ratios = options.ratios or [1.0 / len(options.models)] * len(options.models)

    def summed(key: str) -> bool:
        return not options.unet_only or key.startswith(family.single_file_denoiser_prefixes)

    merged, first_only, metadata = _first_model(options.models[0], ratios[0], dtype, summed, options.device)
    first_keys = set(merged) | set(first_only)
    extra_ratio: dict[str, float] = {}
    for model, ratio in zip(options.models[1:], ratios[1:]):
        log.info("adding %s x%g", model, ratio)
        with safe_open(model, framework="pt", device=options.device) as handle:
            keys = set(handle.keys())
            for key in tqdm(sorted(keys), desc=Path(model).name, leave=False):
                if key not in merged:
                    if options.show_skipped and key not in first_keys:
                        log.info("Skip: %s", key)
                    continue
                merged[key] = merged[key] + ratio * handle.get_tensor(key).to(dtype)
        for key in merged:
            if key not in keys:
                log.warning("%s: %s is missing, the first model's value is used", model, key)
                extra_ratio[key] = extra_ratio.get(key, 0.0) + ratio
    if extra_ratio:
        with safe_open(options.models[0], framework="pt", device=options.device) as handle:
            for key, ratio in extra_ratio.items():
                merged[key] = merged[key] + ratio * handle.get_tensor(key).to(dtype)
    state = {**merged, **first_only}
    write_safetensors_atomic({k: v.cpu() for k, v in state.items()}, output, metadata, save_dtype)
    return output


def _first_model(path: str, ratio: float, dtype: torch.dtype, summed, device: str):
    """(the first model's weighted floating tensors, the tensors kept as they are, its metadata)."""
    merged: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    log.info("loading %s x%g", path, ratio)
    with safe_open(path, framework="pt", device=device) as handle:
        metadata = dict(handle.metadata() or {})
        for key in tqdm(handle.keys(), desc=Path(path).name, leave=False):
            value = handle.get_tensor(key)
            if value.is_floating_point() and summed(key):
                merged[key] = ratio * value.to(dtype)
            else:
                kept[key] = value
    return merged, kept, metadata
