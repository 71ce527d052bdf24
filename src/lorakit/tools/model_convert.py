"""`lorakit model convert`: a base model from one layout to the other (diffusers folder ⇄ original single file).

Both directions go through the family's own members: the model loads with `load_model` (any layout the family
reads) and is written with `save_single_file` or `save_folder`, so a converted file is exactly what training
and the other tools read and write. The output's name decides its layout, as in sd-scripts'
`convert_diffusers20_original_sd.py`: a name with a suffix is a single file, one without a folder.

Precision: without `--save_precision` the model loads in the precision its files store (read from their
headers) and every tensor is written back bit for bit; with it, the model loads in that precision (fp8:
loads as stored and each tensor is cast while it is written). Memory: loading assigns the file's tensors
into the model (one copy), single files are written one tensor at a time and folders in shards of at most
`checkpoint_io.MAX_SHARD_SIZE`, so the peak is about one model.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.errors import ConfigError
from lorakit.families.base import Components, ModelFamily, ModelSource
from lorakit.families.registry import detect_family, get_family
from lorakit.tools.models import ModelOutput, check_model_output

log = logging.getLogger("lorakit.tools")

PRECISIONS = {
    "float": torch.float32, "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
    "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp8": torch.float8_e4m3fn,
    "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
}
_HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_LOADABLE = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class ConvertOptions:
    """What `lorakit model convert` was asked for (cli/model.py has the option names)."""

    source: str
    output: str
    family: str = "auto"
    v2: bool = False
    v_parameterization: bool = False
    save_precision: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # parts in files of their own (vae, clip_l, t5xxl, ae)
    without_text_encoders: bool = False
    problems: list[str] = field(default_factory=list)  # found by the command line, reported with the others


@dataclass
class ConvertPlan:
    family: ModelFamily
    output: ModelOutput
    load_dtype: torch.dtype
    save_dtype: torch.dtype | None


def plan_conversion(options: ConvertOptions) -> ConvertPlan:
    """Every problem with the options at once, before anything loads."""
    problems = list(options.problems)
    source = Path(options.source)
    if not source.exists():
        raise ConfigError([*problems, f"{options.source}: model file or folder not found"])
    for name, path in options.files.items():
        if not Path(path).exists():
            problems.append(f"--{name} {path}: file not found")
    family = get_family(options.family if options.family != "auto" else detect_family(options.source))
    problems += [f"--{name}: {family.title} models take no such file (they take "
                 f"{', '.join('--' + p for p in family.part_files) or 'none'})" for name in options.files if name not in family.part_files]
    output = _check_output(options, family, problems)
    save_dtype = _save_dtype(options.save_precision, family, output, problems)
    if options.without_text_encoders and not (family.single_file_without_encoders and output.kind != "folder"):
        problems.append(f"--without_text_encoders: only {family.title} single files can leave the text encoders out"
                        if family.single_file_without_encoders else
                        f"--without_text_encoders: {family.title} single files always hold their text encoders")
    if problems:
        raise ConfigError(problems)
    stored = stored_dtype(source)
    load_dtype = save_dtype if save_dtype in _LOADABLE else (stored if stored in _LOADABLE else torch.float32)
    return ConvertPlan(family, output, load_dtype, save_dtype if save_dtype not in _LOADABLE else None)


def _check_output(options: ConvertOptions, family: ModelFamily, problems: list[str]) -> ModelOutput:
    try:
        output = check_model_output(options.output, options.source, "model", save_option="output", family=family)
    except ConfigError as exc:
        problems += exc.problems
        return ModelOutput(Path(options.output), "folder")
    if output.kind == "folder" and output.path.exists() and any(output.path.iterdir()):
        problems.append(f"{options.output}: the folder exists and is not empty; give a new name")
    if output.kind != "folder" and Path(options.source).is_file() and not options.files and not options.without_text_encoders \
            and Path(options.source).suffix.lower() == output.path.suffix.lower() and options.save_precision is None:
        problems.append(f"{options.output}: the model is a single file already; give a folder name (no suffix) to "
                        "convert it to a diffusers folder, or --save_precision to change its precision")
    return output


def _save_dtype(name: str | None, family: ModelFamily, output: ModelOutput, problems: list[str]) -> torch.dtype | None:
    if name is None or name == "no":
        return None
    dtype = PRECISIONS.get(name.lower())
    if dtype is None or name.lower() not in family.save_precisions:
        problems.append(f"--save_precision {name}: {family.title} models are saved as one of {', '.join(family.save_precisions)}")
        return None
    if dtype not in _LOADABLE and output.kind == "folder":
        problems.append(f"--save_precision {name}: fp8 is written into single files only (give a .safetensors name)")
    return dtype


def stored_dtype(path: Path) -> torch.dtype | None:
    """The floating dtype that holds most of the bytes of a model's .safetensors files (read from their headers,
    nothing loaded); None when there is none to read (a .ckpt)."""
    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    sizes: Counter[torch.dtype] = Counter()
    for file in files:
        if file.suffix.lower() != ".safetensors":
            continue
        for entry in _header(file).values():
            dtype = _HEADER_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
            if dtype is not None:
                start, end = entry["data_offsets"]
                sizes[dtype] += end - start
    return sizes.most_common(1)[0][0] if sizes else None


def _header(file: Path) -> dict:
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            return json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return {}


def convert_model(options: ConvertOptions) -> Path:
    """Check, load, write; returns the written path."""
    plan = plan_conversion(options)
    family, output = plan.family, plan.output
    single = output.kind != "folder"
    # a single file takes whatever parts there are; a folder is the whole pipeline (tokenizers included), except
    # a family's denoiser file alone, which becomes the denoiser's own diffusers folder
    partial = single or (family.single_file_denoiser_only and not options.files)
    source = ModelSource(options.source, dict(options.files), plan.load_dtype, v2=options.v2,
                         v_parameterization=options.v_parameterization, partial=partial,
                         denoiser_only=single and family.single_file_denoiser_only)
    log.info("loading %s (%s) in %s", options.source, family.title, str(plan.load_dtype).removeprefix("torch."))
    comps = family.load_model(source)
    if options.without_text_encoders:
        comps = Components(comps.denoiser, comps.vae, [None] * len(comps.text_encoders), comps.tokenizers, comps.extras)
    log.info("writing %s (%s)", output.path, "diffusers folder" if not single else f"single {output.kind} file")
    if single:
        family.save_single_file(comps, output.path, output.kind, plan.save_dtype)
    else:
        family.save_folder(comps, output.path)
    return output.path
