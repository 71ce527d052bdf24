"""SD3 single files as the LoRA tools write them: the MMDiT in SAI names plus the VAE and text encoders the
model was loaded with, in the layout of `sd3_medium_incl_clips_t5xxlfp16.safetensors`.

The architecture goes into the `lorakit.configs` metadata so any size (the tiny test models included) loads
back; the file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from lorakit.checkpoint_io import write_safetensors_atomic
from lorakit.families.base import Components
from lorakit.families.common.ldm_keys import vae_to_ldm
from lorakit.families.common.module_io import CONFIGS_METADATA_KEY
from lorakit.families.sd3 import sai_keys

__all__ = ["component_configs", "load_sai_parts", "pipeline_of", "save_sai_single_file", "text_encoder_state"]

ENCODER_NAMES = ("clip_l", "clip_g", "t5xxl")


def load_sai_parts(path: str | Path, dtype: torch.dtype = torch.float32, files: Mapping[str, str] | None = None) -> Components:
    """The parts an SAI file holds (the MMDiT always; VAE and encoders when present, else None), those given in
    `files` (`vae`, `clip_l`, `clip_g`, `t5xxl`) read from there instead; no tokenizers are needed to merge into,
    extract from or pack weights (sd-scripts' merge_sd3_safetensors.py)."""
    from lorakit.families.sd3.loading import _load_single_file, load_text_encoder_file, load_vae_source

    files = dict(files or {})
    parts = _load_single_file(Path(path), dtype, skip=set(files))
    for name, file in files.items():
        parts[name] = load_vae_source(Path(file), dtype) if name == "vae" else load_text_encoder_file(Path(file), name, dtype)
    encoders = [parts[name].eval() if name in parts else None for name in ENCODER_NAMES]
    transformer = parts["transformer"].eval()
    vae = parts["vae"].eval() if "vae" in parts else None
    return Components(transformer, vae, encoders, [], {"source": str(path), "model_type": sai_keys.model_type(dict(transformer.config))})


def save_sai_single_file(comps: Components, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """MMDiT (SAI layout), VAE (LDM layout) and CLIP-L, CLIP-G, T5-XXL under their SAI prefixes (the parts
    that are None are left out, as in SAI's transformer-only files)."""
    state: dict[str, torch.Tensor] = {}
    for part in present_parts(comps):
        state.update(sai_part_state(comps, part))
    configs = part_configs(comps)
    write_safetensors_atomic(state, path, {CONFIGS_METADATA_KEY: json.dumps(configs, default=list)}, dtype)


def present_parts(comps: Components) -> tuple[str, ...]:
    """The parts of an SAI single file this model has (`denoiser`, `vae`, `text_encoder_0..2`)."""
    modules = [comps.denoiser, comps.vae, *comps.text_encoders]
    names = ("denoiser", "vae", "text_encoder_0", "text_encoder_1", "text_encoder_2")
    return tuple(name for name, module in zip(names, modules) if module is not None)


def part_configs(comps: Components) -> dict[str, dict]:
    """The architecture of every present part, for the `lorakit.configs` metadata."""
    configs = {"transformer": _clean(comps.denoiser.config)}
    if comps.vae is not None:
        configs["vae"] = _clean(comps.vae.config)
    for name, encoder in zip(ENCODER_NAMES, comps.text_encoders):
        if encoder is not None:
            configs[name] = encoder.config.to_dict()
    return configs


def sai_part_state(comps: Components, part: str) -> dict[str, torch.Tensor]:
    """One part of an SD3 model under its names in an SAI single file."""
    if part == "denoiser":
        return sai_keys.diffusers_to_sai(comps.denoiser.state_dict(), _clean(comps.denoiser.config))
    if part == "vae":
        return vae_to_ldm(comps.vae.state_dict(), _clean(comps.vae.config), prefix=sai_keys.VAE_PREFIX)
    index = int(part.rsplit("_", 1)[1])
    prefix = sai_keys.TE_PREFIXES[ENCODER_NAMES[index]]
    return {prefix + k: v for k, v in text_encoder_state(comps.text_encoders[index]).items()}


def frozen_x_block_parameters(config: dict, count: int) -> list[str]:
    """sd3_train.py's `--num_last_block_to_freeze N`: the last N image-stream (`x_block`) parameters of the SAI
    MMDiT, as the diffusers parameters they are stacked from."""
    groups = [[name + suffix for name in layer.diffusers]
              for layer in sai_keys.layer_table(config) if ".x_block." in f".{layer.sai}"
              for suffix in sai_keys.suffixes(layer.kind)]
    return [name for group in groups[max(0, len(groups) - count):] for name in group]


def pipeline_of(comps: Components):
    """A diffusers StableDiffusion3Pipeline over these very modules."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    te1, te2, te3 = comps.text_encoders
    tok1, tok2, tok3 = comps.tokenizers
    return StableDiffusion3Pipeline(
        transformer=comps.denoiser, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=comps.vae, text_encoder=te1, tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2,
        text_encoder_3=te3, tokenizer_3=tok3,
    )


def _clean(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"}


def component_configs(comps: Components) -> dict[str, dict]:
    te1, te2, te3 = comps.text_encoders
    return {
        "transformer": _clean(comps.denoiser.config), "vae": _clean(comps.vae.config),
        "clip_l": te1.config.to_dict(), "clip_g": te2.config.to_dict(), "t5xxl": te3.config.to_dict(),
    }


def text_encoder_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An encoder's tensors as SAI files store them (T5's embedding once, as `shared.weight`)."""
    state = encoder.state_dict()
    state.pop("encoder.embed_tokens.weight", None)
    return {k: v for k, v in state.items() if not k.endswith("position_ids")}
