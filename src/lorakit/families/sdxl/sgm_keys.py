"""Key conversion between diffusers' SDXL modules and the original SGM single-file layout.

Stability AI's SDXL checkpoints (`generative-models`, read by ComfyUI, A1111/Forge and sd-scripts) hold:

- `model.diffusion_model.*`   the UNet, LDM block numbering plus `label_emb.0.*` (the size/pooled embedding),
- `first_stage_model.*`       the VAE (same layout as SD 1.x),
- `conditioner.embedders.0.transformer.text_model.*`   CLIP-L in Hugging Face naming,
- `conditioner.embedders.1.model.*`   OpenCLIP-bigG (`transformer.resblocks.N`, fused `attn.in_proj_*`,
  `text_projection` stored transposed).

The UNet's SGM names are also what kohya-format SDXL LoRA files use (`lora_unet_input_blocks_4_1_...`), so
`unet_module_to_sgm` names LoRA targets. The SD 1.x/2.x tables in `families/common/ldm_keys.py` already describe
the shared LDM block layout; this module adds what SDXL has on top of them. Original -> diffusers goes
through diffusers' own converters with an explicit config (never a hub lookup).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
)

from lorakit.checkpoint_io import cast_floating, write_safetensors_atomic, write_torch_atomic
from lorakit.families.base import Components
from lorakit.families.common import ldm_keys
from lorakit.families.common.ldm_keys import (
    CONFIGS_CKPT_KEY,
    CONFIGS_METADATA_KEY,
    UNET_PREFIX,
    VAE_PREFIX,
)

TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
CONFIG_NAMES = ("unet", "vae", "text_encoder", "text_encoder_2")

# SDXL's UNet adds the "text_time" embedding (pooled text + size conditioning) to the SD top-level names.
SGM_UNET_TOP_LEVEL = {
    **ldm_keys.UNET_TOP_LEVEL,
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
}


# ---------------------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------------------


class SgmUnetNames:
    """Renames diffusers UNet weight keys or module paths to their SGM equivalents for one UNet config."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.blocks = ldm_keys.unet_block_prefixes(config)

    def key(self, key: str) -> str:
        """`down_blocks.1.attentions.0.proj_in.weight` -> `input_blocks.4.1.proj_in.weight`."""
        for old, new in sorted(SGM_UNET_TOP_LEVEL.items(), key=lambda item: -len(item[0])):
            if key.startswith(old):
                return new + key[len(old) :]
        for diffusers_prefix, sgm_prefix, kind in self.blocks:
            if key.startswith(diffusers_prefix):
                rest = key[len(diffusers_prefix) :]
                if kind == "resnet":
                    rest = _rename_prefix(rest, ldm_keys.UNET_RESNET)
                return sgm_prefix + rest
        raise ValueError(f"no SGM name for UNet weight {key!r} (unsupported UNet variant)")

    def module(self, path: str) -> str:
        """A module path (`down_blocks.0.resnets.0.conv1`) -> SGM path (`input_blocks.1.0.in_layers.2`)."""
        return self.key(path + ".")[:-1]


def _rename_prefix(rest: str, table: dict[str, str]) -> str:
    for old in sorted(table, key=len, reverse=True):
        if rest.startswith(old):
            return table[old] + rest[len(old) :]
    return rest


def unet_to_sgm(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers SDXL UNet weights -> `model.diffusion_model.*` keys."""
    names = SgmUnetNames(config)
    return {UNET_PREFIX + names.key(k): v for k, v in state_dict.items()}


def sgm_to_unet(checkpoint: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`model.diffusion_model.*` -> diffusers UNet keys (diffusers' converter, label_emb included)."""
    return convert_ldm_unet_checkpoint(checkpoint, config=dict(config))


# ---------------------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------------------


def te1_to_sgm(state_dict: dict[str, torch.Tensor], max_positions: int) -> dict[str, torch.Tensor]:
    """CLIP-L (CLIPTextModel) weights -> `conditioner.embedders.0.transformer.text_model.*`."""
    ldm = ldm_keys.clip_to_ldm(state_dict, max_positions)
    return {TE1_PREFIX + k[len(ldm_keys.SD1_TEXT_PREFIX) :]: v for k, v in ldm.items()}


def sgm_to_te1(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`conditioner.embedders.0.transformer.*` -> CLIPTextModel keys (transformers 5 naming)."""
    te1 = {k: v for k, v in checkpoint.items() if k.startswith(TE1_PREFIX)}
    return ldm_keys.ldm_to_clip(te1)


def te2_to_sgm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP-bigG (CLIPTextModelWithProjection) weights -> `conditioner.embedders.1.model.*`.

    The SD 2.x writer fuses q/k/v and renames the layers; SDXL differs only in keeping the real
    `text_projection` (the pooled embedding conditions the UNet), stored transposed as OpenCLIP does.
    """
    projection = state_dict["text_projection.weight"]
    tower = {k: v for k, v in state_dict.items() if not k.startswith("text_projection.")}
    sd2 = ldm_keys.clip_to_openclip(tower, projection.shape[1])
    out = {TE2_PREFIX + k[len(ldm_keys.SD2_TEXT_PREFIX) :]: v for k, v in sd2.items()}
    out[TE2_PREFIX + "text_projection"] = projection.T.contiguous()
    return out


def sgm_to_te2(checkpoint: dict[str, torch.Tensor], text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`conditioner.embedders.1.model.*` -> CLIPTextModelWithProjection keys (q/k/v split, projection
    transposed back)."""
    converted = convert_open_clip_checkpoint(text_encoder, checkpoint, prefix=TE2_PREFIX)
    return {k: v for k, v in converted.items() if not k.endswith("position_ids")}


# ---------------------------------------------------------------------------------------------------------
# Whole single files
# ---------------------------------------------------------------------------------------------------------


def component_configs(components: Components) -> dict[str, dict[str, Any]]:
    """The diffusers/transformers configs of the four SDXL networks, as JSON-ready dicts."""
    te1, te2 = components.text_encoders
    raw = {
        "unet": dict(components.denoiser.config),
        "vae": dict(components.vae.config),
        "text_encoder": te1.config.to_dict(),
        "text_encoder_2": te2.config.to_dict(),
    }
    return json.loads(json.dumps(raw, default=str))


def components_to_sgm(components: Components) -> dict[str, torch.Tensor]:
    """Every weight of an SDXL model in the original SGM single-file layout."""
    state: dict[str, torch.Tensor] = {}
    for part in ("denoiser", "vae", "text_encoder_0", "text_encoder_1"):
        state.update(sgm_part_state(components, part))
    return state


def sgm_part_state(components: Components, part: str) -> dict[str, torch.Tensor]:
    """One part (`denoiser`, `vae`, `text_encoder_0`, `text_encoder_1`) of an SDXL model under its SGM names."""
    jsonable = lambda config: json.loads(json.dumps(dict(config), default=str))  # noqa: E731
    if part == "denoiser":
        return unet_to_sgm(components.denoiser.state_dict(), jsonable(components.denoiser.config))
    if part == "vae":
        return ldm_keys.vae_to_ldm(components.vae.state_dict(), jsonable(components.vae.config), prefix=VAE_PREFIX)
    te1, te2 = components.text_encoders
    if part == "text_encoder_0":
        return te1_to_sgm(te1.state_dict(), te1.config.max_position_embeddings)
    return te2_to_sgm(te2.state_dict())


def save_sdxl_single_file(
    components: Components, path: str | Path, *, fmt: Literal["safetensors", "ckpt"] = "safetensors",
    dtype: torch.dtype | None = None,
) -> None:
    """Write `components` as one SGM-layout checkpoint, atomically, with the configs in its metadata
    (`lorakit.configs`) so architectures of any size, tiny test models included, load back."""
    state = components_to_sgm(components)
    configs_json = json.dumps(component_configs(components))
    if fmt == "safetensors":
        write_safetensors_atomic(state, path, {CONFIGS_METADATA_KEY: configs_json, "lorakit.family": "sdxl"}, dtype)
    elif fmt == "ckpt":
        write_torch_atomic({"state_dict": cast_floating(state, dtype), CONFIGS_CKPT_KEY: configs_json}, path)
    else:
        raise ValueError(f"fmt must be 'safetensors' or 'ckpt', not {fmt!r}")
