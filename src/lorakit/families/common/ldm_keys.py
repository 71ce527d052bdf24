"""Key conversion between diffusers' Stable Diffusion 1.x/2.x modules and the original LDM single-file layout.

Original checkpoints (CompVis / Stability, as read by A1111, ComfyUI and sd-scripts) hold every model in one
state dict:

- `model.diffusion_model.*`   the UNet (`input_blocks` / `middle_block` / `output_blocks`),
- `first_stage_model.*`       the VAE (`encoder.down.N.block.M`, `mid.attn_1`, ...),
- `cond_stage_model.transformer.text_model.*`   SD 1.x: OpenAI CLIP-L in Hugging Face naming,
- `cond_stage_model.model.*`  SD 2.x: OpenCLIP-H (`transformer.resblocks.N`, fused `attn.in_proj_weight`).

The original -> diffusers direction reuses diffusers' own converters (`diffusers.loaders.single_file_utils`),
called with an explicit config so they never reach a model hub. The diffusers -> original direction is
written here, as rename tables plus small functions that are generic over `layers_per_block` and over which
blocks carry attention. `save_sd_single_file` writes a complete original-layout file and records the diffusers
configs in its metadata (`lorakit.configs`) so files of any size, tiny test models included, load back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)

from lorakit.checkpoint_io import cast_floating, write_safetensors_atomic, write_torch_atomic
from lorakit.families.base import Components
from lorakit.families.common.module_io import CONFIGS_CKPT_KEY, CONFIGS_METADATA_KEY

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."

# ---------------------------------------------------------------------------------------------------------
# Rename tables (diffusers name -> original name)
# ---------------------------------------------------------------------------------------------------------

UNET_TOP_LEVEL = {
    "conv_in.": "input_blocks.0.0.",
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}

# diffusers ResnetBlock2D -> LDM ResBlock (in_layers = GroupNorm, SiLU, conv; out_layers = GroupNorm, SiLU,
# Dropout, conv; emb_layers = SiLU, Linear).
UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}

VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}

VAE_TOP_LEVEL = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}

# diffusers Attention (VAE mid block) -> LDM AttnBlock, whose projections are 1x1 convolutions.
VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}

OPENCLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}

OPENCLIP_LAYER = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


def _rename_prefix(key: str, table: dict[str, str]) -> str | None:
    """Replace the longest prefix of `key` found in `table`; None when no prefix matches."""
    for old in sorted(table, key=len, reverse=True):
        if key.startswith(old):
            return table[old] + key[len(old) :]
    return None


def _rename_inner(rest: str, table: dict[str, str]) -> str:
    renamed = _rename_prefix(rest, table)
    return rest if renamed is None else renamed


# ---------------------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------------------


def unet_block_prefixes(config: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(diffusers prefix, LDM prefix, kind) for every block of a UNet with this config.

    LDM numbers `input_blocks` consecutively: block 0 is conv_in, then per resolution level
    `layers_per_block` (resnet[, attention]) entries and one downsampler; `output_blocks` have
    `layers_per_block + 1` entries per level, the upsampler sitting in the level's last entry after the
    resnet (index 1) or after the resnet and attention (index 2).
    """
    per_level = config["layers_per_block"]
    levels = len(config["down_block_types"])
    table: list[tuple[str, str, str]] = []
    for level in range(levels):
        for j in range(per_level):
            ldm = f"input_blocks.{1 + level * (per_level + 1) + j}"
            table.append((f"down_blocks.{level}.resnets.{j}.", f"{ldm}.0.", "resnet"))
            table.append((f"down_blocks.{level}.attentions.{j}.", f"{ldm}.1.", "attention"))
        downsample = f"input_blocks.{1 + level * (per_level + 1) + per_level}.0.op."
        table.append((f"down_blocks.{level}.downsamplers.0.conv.", downsample, "plain"))
    table += [
        ("mid_block.resnets.0.", "middle_block.0.", "resnet"),
        ("mid_block.attentions.0.", "middle_block.1.", "attention"),
        ("mid_block.resnets.1.", "middle_block.2.", "resnet"),
    ]
    for level, block_type in enumerate(config["up_block_types"]):
        for j in range(per_level + 1):
            ldm = f"output_blocks.{level * (per_level + 1) + j}"
            table.append((f"up_blocks.{level}.resnets.{j}.", f"{ldm}.0.", "resnet"))
            table.append((f"up_blocks.{level}.attentions.{j}.", f"{ldm}.1.", "attention"))
        upsample_slot = 2 if "CrossAttn" in block_type else 1
        last = f"output_blocks.{level * (per_level + 1) + per_level}.{upsample_slot}.conv."
        table.append((f"up_blocks.{level}.upsamplers.0.conv.", last, "plain"))
    return table


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel (SD 1.x/2.x) weights -> `model.diffusion_model.*` keys."""
    blocks = unet_block_prefixes(config)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        out[UNET_PREFIX + _unet_key_to_ldm(key, blocks)] = value
    return out


def _unet_key_to_ldm(key: str, blocks: list[tuple[str, str, str]]) -> str:
    top = _rename_prefix(key, UNET_TOP_LEVEL)
    if top is not None:
        return top
    for diffusers_prefix, ldm_prefix, kind in blocks:
        if key.startswith(diffusers_prefix):
            rest = key[len(diffusers_prefix) :]
            return ldm_prefix + (_rename_inner(rest, UNET_RESNET) if kind == "resnet" else rest)
    raise ValueError(f"no original-layout name for UNet weight {key!r} (unsupported UNet variant)")


def ldm_to_unet(checkpoint: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`model.diffusion_model.*` weights -> diffusers UNet2DConditionModel keys (diffusers' converter)."""
    return convert_ldm_unet_checkpoint(checkpoint, config=dict(config))


# ---------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------


def _vae_block_patterns(levels: int) -> list[tuple[re.Pattern[str], Any]]:
    """Regex renames for the VAE's numbered blocks; the decoder's levels are numbered in reverse in LDM."""
    return [
        (re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\."), lambda m: f"encoder.down.{m[1]}.block.{m[2]}."),
        (re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\."), lambda m: f"encoder.down.{m[1]}.downsample."),
        (
            re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\."),
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.",
        ),
        (
            re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\."),
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.",
        ),
        (re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\."), lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\."), lambda m: f"{m[1]}.mid.attn_1."),
    ]


def vae_to_ldm(
    state_dict: dict[str, torch.Tensor], config: dict[str, Any], prefix: str = VAE_PREFIX
) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL weights -> `first_stage_model.*` keys (LDM stores attention as 1x1 convs)."""
    patterns = _vae_block_patterns(len(config["block_out_channels"]))
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        out[prefix + _vae_key_to_ldm(key, patterns)] = _vae_value_to_ldm(key, value)
    return out


def _vae_key_to_ldm(key: str, patterns: list[tuple[re.Pattern[str], Any]]) -> str:
    top = _rename_prefix(key, VAE_TOP_LEVEL)
    if top is not None:
        return top
    for pattern, replace in patterns:
        match = pattern.match(key)
        if match:
            rest = key[match.end() :]
            inner = VAE_ATTENTION if ".attentions." in key else VAE_RESNET
            return replace(match) + _rename_inner(rest, inner)
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def _vae_value_to_ldm(key: str, value: torch.Tensor) -> torch.Tensor:
    if ".attentions." in key and key.endswith(".weight") and value.ndim == 2:
        return value[:, :, None, None]
    return value


def ldm_to_vae(checkpoint: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """LDM VAE weights (`first_stage_model.`/`vae.` prefix or none) -> diffusers AutoencoderKL keys."""
    return convert_ldm_vae_checkpoint(checkpoint, dict(config))


# ---------------------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------------------


def _without_text_model_level(key: str) -> str:
    """transformers 5 CLIPTextModel has no `text_model.` level in its keys; older files do."""
    return key[len("text_model.") :] if key.startswith("text_model.") else key


def clip_to_ldm(state_dict: dict[str, torch.Tensor], max_positions: int) -> dict[str, torch.Tensor]:
    """SD 1.x CLIPTextModel weights -> `cond_stage_model.transformer.text_model.*` (Hugging Face naming).

    `position_ids` is written as older transformers versions (and so most SD 1.x files) stored it, so strict
    loaders of that era find every key they expect.
    """
    out = {f"{SD1_TEXT_PREFIX}text_model.{_without_text_model_level(k)}": v for k, v in state_dict.items()}
    out[f"{SD1_TEXT_PREFIX}text_model.embeddings.position_ids"] = torch.arange(max_positions).unsqueeze(0)
    return out


def ldm_to_clip(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`cond_stage_model.transformer.*` -> CLIPTextModel keys (transformers 5 naming, no position_ids)."""
    converted = convert_ldm_clip_checkpoint(checkpoint)
    return {
        _without_text_model_level(k): v for k, v in converted.items() if not k.endswith("embeddings.position_ids")
    }


def clip_to_openclip(state_dict: dict[str, torch.Tensor], hidden_size: int) -> dict[str, torch.Tensor]:
    """SD 2.x CLIPTextModel weights -> OpenCLIP `cond_stage_model.model.*` keys.

    q/k/v projections are fused into `attn.in_proj_*` (q, k, v order). The diffusers model holds only the 23
    layers SD 2.x uses (it conditions on the penultimate layer); those are the layers written, and loaders of
    24-layer OpenCLIP towers never run the missing last one. OpenCLIP's `text_projection` is used only for
    the pooled embedding, which SD 2.x ignores; an identity matrix is written so loaders that expect the key
    find one of the right shape.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        key = _without_text_model_level(key)
        if key in OPENCLIP_TOP_LEVEL:
            out[OPENCLIP_TOP_LEVEL[key]] = value
            continue
        match = re.match(r"encoder\.layers\.(\d+)\.(.*)", key)
        if match is None:
            raise ValueError(f"no OpenCLIP name for text-encoder weight {key!r}")
        layer, rest = match[1], match[2]
        qkv = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if qkv:
            fused.setdefault((layer, qkv[2]), {})[qkv[1]] = value
            continue
        out[f"transformer.resblocks.{layer}.{_rename_inner(rest, OPENCLIP_LAYER)}"] = value
    for (layer, leaf), parts in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    dtype = out["ln_final.weight"].dtype
    out["text_projection"] = torch.eye(hidden_size, dtype=dtype)
    return {SD2_TEXT_PREFIX + k: v for k, v in out.items()}


def openclip_to_clip(
    checkpoint: dict[str, torch.Tensor], text_encoder: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """OpenCLIP `cond_stage_model.model.*` -> CLIPTextModel keys for `text_encoder`'s layer count.

    Layers beyond the model's `num_hidden_layers` (the 24th of a real SD 2.x file) and `text_projection` are
    dropped: the diffusers SD 2.x text encoder stops at the penultimate layer and has no projection.
    """
    converted = convert_open_clip_checkpoint(text_encoder, checkpoint, prefix=SD2_TEXT_PREFIX)
    layers = text_encoder.config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        key = _without_text_model_level(key)
        if key.startswith("text_projection"):
            continue
        match = re.match(r"encoder\.layers\.(\d+)\.", key)
        if match and int(match[1]) >= layers:
            continue
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# Whole single files
# ---------------------------------------------------------------------------------------------------------


def component_configs(components: Components) -> dict[str, dict[str, Any]]:
    """The diffusers/transformers configs of the UNet, VAE and text encoder, as JSON-ready dicts."""
    return {
        "unet": _jsonable(dict(components.denoiser.config)),
        "vae": _jsonable(dict(components.vae.config)),
        "text_encoder": _jsonable(components.text_encoders[0].config.to_dict()),
    }


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config, default=str))


def components_to_ldm(components: Components) -> dict[str, torch.Tensor]:
    """Every weight of an SD 1.x/2.x model in the original single-file layout."""
    state: dict[str, torch.Tensor] = {}
    for part in ("denoiser", "vae", "text_encoder_0"):
        state.update(ldm_part_state(components, part))
    return state


def ldm_part_state(components: Components, part: str) -> dict[str, torch.Tensor]:
    """One part (`denoiser`, `vae`, `text_encoder_0`) of an SD 1.x/2.x model under its single-file names."""
    if part == "denoiser":
        return unet_to_ldm(components.denoiser.state_dict(), _jsonable(dict(components.denoiser.config)))
    if part == "vae":
        return vae_to_ldm(components.vae.state_dict(), _jsonable(dict(components.vae.config)))
    text_encoder = components.text_encoders[0]
    text_config = text_encoder.config
    if components.extras.get("version", "sd1") == "sd2":
        return clip_to_openclip(text_encoder.state_dict(), text_config.hidden_size)
    return clip_to_ldm(text_encoder.state_dict(), text_config.max_position_embeddings)


def save_sd_single_file(
    components: Components, path: str | Path, *, fmt: Literal["safetensors", "ckpt"] = "safetensors",
    dtype: torch.dtype | None = None,
) -> None:
    """Write `components` as one original-layout checkpoint, atomically.

    The diffusers configs travel with the weights (safetensors metadata `lorakit.configs`, or a top-level
    `lorakit_configs` string in a .ckpt), so `load_sd_components` rebuilds exactly this architecture.
    """
    state = components_to_ldm(components)
    configs_json = json.dumps(component_configs(components))
    if fmt == "safetensors":
        metadata = {CONFIGS_METADATA_KEY: configs_json, "lorakit.sd_version": components.extras.get("version", "sd1")}
        write_safetensors_atomic(state, path, metadata, dtype)
    elif fmt == "ckpt":
        write_torch_atomic({"state_dict": cast_floating(state, dtype), CONFIGS_CKPT_KEY: configs_json}, path)
    else:
        raise ValueError(f"fmt must be 'safetensors' or 'ckpt', not {fmt!r}")
