"""FLUX files as the LoRA tools read and write them (sd-scripts' `flux_merge_lora.py` inputs and outputs).

The tools work on whichever parts they were given: the BFL transformer file (`--flux_model`) and, only when
a LoRA has text-encoder modules, `--clip_l` and `--t5xxl`. Each part is written back in the layout it came
in: the transformer in BFL names (fused q/k/v, (shift, scale) final modulation), CLIP-L with the
`text_model.` level, T5 without the tied `encoder.embed_tokens` copy. Every file carries its architecture in
the `lorakit.configs` metadata (as the tiny models' files do) and is written to a temporary name first.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lorakit.checkpoint_io import write_safetensors_atomic
from lorakit.families.base import Components
from lorakit.families.common.bfl_parts import save_bfl_transformer, save_t5_file
from lorakit.families.common.module_io import CONFIGS_METADATA_KEY
from lorakit.families.flux import bfl_keys
from lorakit.families.flux.loading import (
    load_clip_l_file,
    load_t5_file,
    load_transformer_file,
)

__all__ = ["load_flux_parts", "save_clip_l_file", "save_t5_file", "save_transformer_file"]


def load_flux_parts(flux_model: str, *, clip_l: str | None = None, t5xxl: str | None = None, dtype: torch.dtype = torch.float32) -> Components:
    """The transformer and, when given, CLIP-L and T5 (None where not given); no VAE, no tokenizers."""
    transformer = load_transformer_file(Path(flux_model), dtype).eval()
    clip = load_clip_l_file(Path(clip_l), dtype).eval() if clip_l else None
    t5 = load_t5_file(Path(t5xxl), dtype).eval() if t5xxl else None
    return Components(transformer, None, [clip, t5], [], {"source": flux_model, "schnell": not transformer.config.guidance_embeds})


def load_transformer_alone(path: str, dtype: torch.dtype = torch.float32) -> Components:
    """Only the transformer: of a BFL/diffusers-named file, or of a diffusers folder (the pipeline folder or its
    `transformer/`)."""
    from diffusers import FluxTransformer2DModel

    from lorakit.errors import CheckpointError
    from lorakit.families.common.module_io import from_pretrained

    folder = Path(path)
    if folder.is_file():
        transformer = load_transformer_file(folder, dtype)
    else:
        subfolder = "transformer" if (folder / "transformer" / "config.json").is_file() else ""
        if not (folder / subfolder / "config.json").is_file():
            raise CheckpointError(f"{path}: not a diffusers FLUX transformer folder (no config.json, no transformer/config.json)")
        transformer = from_pretrained(FluxTransformer2DModel, folder, subfolder, what="FLUX transformer", torch_dtype=dtype)
    return Components(transformer.eval(), None, [None, None], [], {"source": path, "schnell": not transformer.config.guidance_embeds})


def _metadata(component: str, config: dict) -> dict[str, str]:
    clean = {k: v for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"}
    return {CONFIGS_METADATA_KEY: json.dumps({component: clean}, default=list)}


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def save_transformer_file(transformer: nn.Module, path: str | Path, dtype: torch.dtype | None = None, *, layout: str = "bfl") -> None:
    """The transformer as one BFL-layout `.safetensors` (what `flux1-dev.safetensors` holds), streamed one block at
    a time (`common/bfl_parts.py`, sd-scripts' `--mem_eff_load_save`). `layout="diffusers"` keeps diffusers' names
    (sd-scripts' `flux_merge_lora.py --diffusers`)."""
    if layout == "diffusers":
        write_safetensors_atomic(_cast(transformer.state_dict(), dtype), path, _metadata("transformer", transformer.config))
        return
    save_bfl_transformer(transformer, path, bfl_keys.diffusers_to_bfl, dtype)


def bfl_pieces(state: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """`diffusers_to_bfl` of the top-level layers, then of one block at a time (each renamed to block 0 for the
    conversion and back), in file order."""
    blocks = (bfl_keys.DOUBLE_PREFIX, bfl_keys.SINGLE_PREFIX)
    yield bfl_keys.diffusers_to_bfl({k: v for k, v in state.items() if not k.startswith(tuple(f"{d}." for _, d in blocks))})
    for bfl_prefix, diff_prefix in blocks:
        for index in range(bfl_keys.block_count(state, diff_prefix)):
            source = f"{diff_prefix}.{index}."
            block = {f"{diff_prefix}.0.{k[len(source):]}": v for k, v in state.items() if k.startswith(source)}
            converted = bfl_keys.diffusers_to_bfl(block)
            first = f"{bfl_prefix}.0."
            yield {f"{bfl_prefix}.{index}.{k[len(first):]}": v for k, v in converted.items() if k.startswith(first)}


def save_clip_l_file(clip: nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """CLIP-L in the transformers layout with the `text_model.` level (`clip_l.safetensors`)."""
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in clip.state_dict().items()}
    write_safetensors_atomic(_cast(state, dtype), path, _metadata("clip_l", clip.config.to_dict()))
