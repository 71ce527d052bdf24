"""The parts FLUX.1 and Chroma share, and the streamed writer of BFL-layout transformer files, in the files the community distributes: the T5-XXL encoder
(`t5xxl_fp16.safetensors`, transformers' T5EncoderModel layout) and the 16-channel autoencoder (`ae.safetensors`,
LDM layout). Their real architectures are bundled in `configs/`; lorakit's own files (the tiny test models
included) carry theirs in the `lorakit.configs` metadata, which wins."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL
from torch import nn
from transformers import T5Config, T5EncoderModel

from lorakit.atomic import staged_file
from lorakit.checkpoint_io import (
    read_checkpoint,
    write_safetensors_atomic,
    write_safetensors_streaming,
)
from lorakit.errors import CheckpointError
from lorakit.families.common.bfl_keys import DOUBLE_PREFIX, SINGLE_PREFIX, block_count
from lorakit.families.common.ldm_keys import ldm_to_vae
from lorakit.families.common.module_io import (
    CONFIGS_METADATA_KEY,
    assign_weights,
    embedded_config,
)

_CONFIGS = resources.files("lorakit") / "families" / "common" / "configs"
SHARED_CONFIGS = ("t5xxl", "ae")


def shared_config(name: str) -> dict[str, Any]:
    """A bundled real config of a shared part: `t5xxl` or `ae`."""
    return json.loads((_CONFIGS / f"{name}.json").read_text(encoding="utf-8"))


def load_t5_file(file: Path, dtype: torch.dtype, option: str = "--t5xxl") -> T5EncoderModel:
    """The T5-XXL encoder from `t5xxl_fp16.safetensors` (transformers T5EncoderModel layout)."""
    checkpoint = read_checkpoint(file)
    config = T5Config.from_dict(embedded_config(checkpoint, "t5xxl") or shared_config("t5xxl"))
    with init_empty_weights():
        model = T5EncoderModel(config)
    weights = {k.removeprefix("text_encoders.t5xxl.transformer."): v for k, v in checkpoint.state_dict.items()}
    if not any(k.startswith("encoder.block.") for k in weights):
        raise CheckpointError(f"{file}: not a T5 encoder (no encoder.block.* weights) ({option})")
    # the token embedding is shared: files store it as `shared.weight`, `encoder.embed_tokens.weight` or both
    embedding = weights.get("shared.weight", weights.get("encoder.embed_tokens.weight"))
    if embedding is not None:
        weights["shared.weight"] = weights["encoder.embed_tokens.weight"] = embedding
    assign_weights(model, weights, file=str(file), component="T5-XXL", dtype=dtype, extra_ok=True)
    return model


def load_ae_file(file: Path, dtype: torch.dtype, option: str = "--ae") -> AutoencoderKL:
    """The 16-channel autoencoder from `ae.safetensors` (LDM layout) or a diffusers-layout VAE file."""
    checkpoint = read_checkpoint(file)
    config = embedded_config(checkpoint, "ae") or shared_config("ae")
    state = checkpoint.state_dict
    if any(k.startswith("encoder.down.") for k in state) or any(".encoder.down." in k for k in state):
        weights = ldm_to_vae(state, config)
    elif any(k.startswith("encoder.down_blocks.") for k in state):
        weights = state
    else:
        raise CheckpointError(f"{file}: not an autoencoder (no encoder.down.* weights) ({option})")
    with init_empty_weights():
        model = AutoencoderKL.from_config(config)
    assign_weights(model, weights, file=str(file), component="autoencoder", dtype=dtype)
    return model


def configs_metadata(component: str, config: dict) -> dict[str, str]:
    """The `lorakit.configs` metadata that lets the loaders rebuild a part of any size."""
    clean = {k: v for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"}
    return {CONFIGS_METADATA_KEY: json.dumps({component: clean}, default=list)}


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def save_t5_file(t5: nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """The T5 encoder in the transformers layout (`t5xxl_fp16.safetensors`); the tied embedding stored once."""
    state = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    write_safetensors_atomic(cast_state(state, dtype), path, configs_metadata("t5xxl", t5.config.to_dict()))


def save_bfl_transformer(transformer: nn.Module, path: str | Path, to_bfl: Callable[[dict], dict],
                         dtype: torch.dtype | None = None) -> None:
    """A diffusers transformer as one BFL-layout `.safetensors`, streamed: the fused BFL weights are built one block
    at a time and written at once, so saving adds about one block to the memory the loaded model takes
    (sd-scripts' `--mem_eff_load_save`). `to_bfl` is the family's diffusers -> BFL converter."""
    state = transformer.state_dict()
    meta_state = {k: torch.empty(v.shape, dtype=dtype if dtype and v.is_floating_point() else v.dtype, device="meta")
                  for k, v in state.items()}
    layout = {k: (v.shape, v.dtype) for piece in _bfl_pieces(meta_state, to_bfl) for k, v in piece.items()}
    pieces = (cast_state(piece, dtype) for piece in _bfl_pieces(state, to_bfl))
    with staged_file(Path(path)) as tmp:
        write_safetensors_streaming(tmp, layout, pieces, configs_metadata("transformer", transformer.config))


def _bfl_pieces(state: dict[str, torch.Tensor], to_bfl: Callable[[dict], dict]) -> Iterator[dict[str, torch.Tensor]]:
    """`to_bfl` of the top-level layers, then of one block at a time (each renamed to block 0 for the conversion
    and back), in file order."""
    blocks = (DOUBLE_PREFIX, SINGLE_PREFIX)
    yield to_bfl({k: v for k, v in state.items() if not k.startswith(tuple(f"{d}." for _, d in blocks))})
    for bfl_prefix, diff_prefix in blocks:
        for index in range(block_count(state, diff_prefix)):
            source = f"{diff_prefix}.{index}."
            block = {f"{diff_prefix}.0.{k[len(source):]}": v for k, v in state.items() if k.startswith(source)}
            converted = to_bfl(block)
            first = f"{bfl_prefix}.0."
            yield {f"{bfl_prefix}.{index}.{k[len(first):]}": v for k, v in converted.items() if k.startswith(first)}
