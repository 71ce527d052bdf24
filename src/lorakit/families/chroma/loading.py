"""Load Chroma offline: a diffusers ChromaPipeline folder, or the single files the community distributes.

sd-scripts' `flux_train_network.py --model_type chroma` takes the transformer with `--pretrained_model_name_or_path`
(`Chroma1-HD.safetensors`, BFL's FLUX.1 names, optionally under ComfyUI's `model.diffusion_model.` prefix) and,
as for FLUX.1, `--t5xxl` (T5-XXL, transformers layout) and `--ae` (the FLUX autoencoder, LDM layout); Chroma has
no CLIP-L. A diffusers folder (`model_index.json` with transformer/, vae/, text_encoder/, tokenizer/) holds
everything; the two flags then replace parts. The T5 tokenizer is read from local files only: beside the --t5xxl
file, in a `tokenizer/` or `tokenizer_2/` folder there, or in the pipeline folder.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    ChromaTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
)
from torch import nn
from transformers import T5EncoderModel

from lorakit.checkpoint_io import read_checkpoint
from lorakit.errors import CheckpointError
from lorakit.families.base import Components
from lorakit.families.chroma import bfl_keys
from lorakit.families.common.bfl_parts import load_ae_file, load_t5_file
from lorakit.families.common.headers import class_name, safetensors_keys
from lorakit.families.common.module_io import (
    assign_weights,
    embedded_config,
    from_pretrained,
    read_json,
    reject_checkpoint,
)
from lorakit.families.common.tokenizers import find_t5_tokenizer, t5_tokenizer_in

_PACKAGE = resources.files("lorakit") / "families" / "chroma"
T5_TOKENIZER_DIRS = ("", "tokenizer", "tokenizer_2", "t5_tokenizer")  # beside the --t5xxl file
MISSING_T5_TOKENIZER = (
    "no T5 tokenizer found. Chroma needs the real T5-XXL tokenizer, offline: put its files (tokenizer.json or "
    "spiece.model, e.g. the tokenizer/ folder of the Chroma1-HD diffusers repository) next to the --t5xxl file, in a "
    "tokenizer/ folder beside it, or pass a diffusers Chroma folder"
)
CHROMA_PIPELINES = ("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline")
CHROMA_MODEL = "ChromaTransformer2DModel"


def bundled_config() -> dict[str, Any]:
    """Chroma1's transformer config (19 double, 38 single blocks, width 3072)."""
    return json.loads((_PACKAGE / "configs" / "transformer.json").read_text(encoding="utf-8"))


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """ChromaPipeline's scheduler: Euler on the flow, shift growing with the image token count as FLUX.1's."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


def is_chroma_source(path: str) -> bool:
    """Whether `path` is a Chroma model, from a folder's class names or a `.safetensors` header only."""
    source = Path(path)
    if source.is_dir():
        return (class_name(source / "model_index.json") in CHROMA_PIPELINES
                or CHROMA_MODEL in (class_name(source / "transformer" / "config.json"), class_name(source / "config.json")))
    keys = safetensors_keys(source)
    return keys is not None and bfl_keys.is_chroma_keys(keys)


def load_chroma_components(path: str, *, t5xxl: str | None = None, ae: str | None = None,
                           dtype: torch.dtype = torch.float32, text_encoders: bool = True) -> Components:
    """Transformer, AE and T5 (with its tokenizer) from a diffusers folder or the single files; every missing
    part is named with the option that provides it. Without `text_encoders` no T5 and no tokenizer is built
    (every caption's outputs are cached)."""
    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"{path}: Chroma model file or folder not found (--pretrained_model_name_or_path)")
    for flag, value in (("--t5xxl", t5xxl), ("--ae", ae)):
        if value is not None and not Path(value).exists():
            raise CheckpointError(f"{value}: file not found ({flag})")
    if source.is_dir() and (source / "model_index.json").is_file():
        parts = _load_pipeline_folder(source, dtype, skip_t5=bool(t5xxl) or not text_encoders, skip_ae=bool(ae))
    else:
        parts = {"transformer": load_transformer_alone(str(source), dtype)}
    if t5xxl and text_encoders:
        parts["t5xxl"] = load_t5_file(Path(t5xxl), dtype)
        parts["t5_tokenizer"] = find_t5_tokenizer([Path(t5xxl)], T5_TOKENIZER_DIRS, "Chroma")
    if ae:
        parts["ae"] = load_ae_file(Path(ae), dtype)
    needed = (("--t5xxl", "t5xxl"), ("--ae", "ae")) if text_encoders else (("--ae", "ae"),)
    missing = [flag for flag, key in needed if key not in parts]
    if missing:
        raise CheckpointError(f"{path}: a Chroma transformer file holds only the transformer; also pass {', '.join(missing)} "
                              "(as with sd-scripts' flux_train_network.py --model_type chroma), or pass a diffusers Chroma folder")
    encoders, tokenizers = ([parts["t5xxl"].eval()], [parts["t5_tokenizer"]]) if text_encoders else ([], [])
    return Components(parts["transformer"].eval(), parts["ae"].eval(), encoders, tokenizers, {"source": str(path)})


def _load_pipeline_folder(folder: Path, dtype: torch.dtype, *, skip_t5: bool, skip_ae: bool) -> dict[str, Any]:
    pipeline = read_json(folder / "model_index.json").get("_class_name", "")
    if pipeline not in CHROMA_PIPELINES:
        raise CheckpointError(f"{folder}: this is a {pipeline or 'non-Chroma'} model folder, not Chroma; choose its family")
    parts: dict[str, Any] = {"transformer": _from_pretrained(ChromaTransformer2DModel, folder, "transformer", torch_dtype=dtype)}
    if not skip_ae:
        parts["ae"] = _from_pretrained(AutoencoderKL, folder, "vae", torch_dtype=dtype)
    if not skip_t5:
        parts["t5xxl"] = _from_pretrained(T5EncoderModel, folder, "text_encoder", dtype=dtype)
        parts["t5_tokenizer"] = t5_tokenizer_in(folder / "tokenizer")
        if parts["t5_tokenizer"] is None:
            raise CheckpointError(f"{folder / 'tokenizer'}: {MISSING_T5_TOKENIZER}")
    return parts


def _from_pretrained(cls, folder: Path, subfolder: str, **kwargs) -> nn.Module:
    return from_pretrained(cls, folder, subfolder, what=f"Chroma {subfolder or 'transformer'}", **kwargs)


def load_transformer_alone(path: str, dtype: torch.dtype = torch.float32) -> ChromaTransformer2DModel:
    """The transformer of a single file (original or diffusers names) or of a diffusers folder (the pipeline's or
    its `transformer/`)."""
    source = Path(path)
    if source.is_file():
        return load_transformer_file(source, dtype)
    subfolder = "transformer" if (source / "transformer" / "config.json").is_file() else ""
    if not (source / subfolder / "config.json").is_file():
        raise CheckpointError(f"{path}: not a diffusers Chroma transformer folder (no config.json, no transformer/config.json)")
    return _from_pretrained(ChromaTransformer2DModel, source, subfolder, torch_dtype=dtype)


def load_transformer_file(file: Path, dtype: torch.dtype) -> ChromaTransformer2DModel:
    """A Chroma transformer from a single file in the original (BFL) or diffusers names."""
    checkpoint = read_checkpoint(file)
    state = checkpoint.state_dict
    if not bfl_keys.is_chroma_keys(state):
        reject_checkpoint(checkpoint, "chroma", "expected a Chroma transformer (distilled_guidance_layer.*, double_blocks.*)")
    if "x_embedder.weight" in state:
        config, weights = embedded_config(checkpoint, "transformer") or bundled_config(), state
    else:
        config = embedded_config(checkpoint, "transformer") or bfl_keys.transformer_config(state, checkpoint.path)
        weights = bfl_keys.bfl_to_diffusers(state, checkpoint.path)
    del state, checkpoint
    with init_empty_weights():
        model = ChromaTransformer2DModel.from_config(config)
    assign_weights(model, weights, file=str(file), component="Chroma transformer", dtype=dtype)
    return model
