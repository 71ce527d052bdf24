"""`--vae`: a replacement VAE from a diffusers folder or a single file (LDM or diffusers layout), for the families
whose VAE is the SD one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL

from lorakit.checkpoint_io import LoadedCheckpoint, read_checkpoint
from lorakit.errors import CheckpointError
from lorakit.families.common import ldm_keys
from lorakit.families.common.module_io import (
    assign_weights,
    embedded_configs,
    from_pretrained,
    skip_weight_init,
)

CONFIG_NAMES = ("unet", "vae", "text_encoder")  # the parts lorakit's own single files carry configs for


def load_vae(path: str, config: dict[str, Any], *, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A VAE from a diffusers VAE folder, or a single file in LDM layout (with or without the
    `first_stage_model.` prefix, or inside a full checkpoint) or diffusers layout.

    `config` (the base model's VAE config) describes the architecture of a single file unless the file
    carries lorakit's own config metadata.
    """
    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"{path}: VAE file or folder not found")
    if source.is_dir():
        return _load_vae_folder(source, dtype)
    checkpoint = read_checkpoint(source)
    embedded = embedded_configs(checkpoint, CONFIG_NAMES)
    vae_config = embedded["vae"] if embedded else config
    weights = _vae_weights(checkpoint, vae_config)
    with init_empty_weights(), skip_weight_init():
        vae = AutoencoderKL.from_config(vae_config)
    assign_weights(vae, weights, file=str(source), component="VAE", dtype=dtype, extra_ok=True, fit_unit_dims=True)
    return vae.eval()


def _load_vae_folder(folder: Path, dtype: torch.dtype) -> AutoencoderKL:
    if (folder / "config.json").is_file():
        return from_pretrained(AutoencoderKL, folder, "", torch_dtype=dtype).eval()
    if (folder / "vae" / "config.json").is_file():
        return from_pretrained(AutoencoderKL, folder, "vae", torch_dtype=dtype).eval()
    raise CheckpointError(f"{folder}: not a diffusers VAE folder (no config.json or vae/config.json)")


def _vae_weights(checkpoint: LoadedCheckpoint, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Diffusers-layout VAE keys from whichever layout the file uses."""
    state = checkpoint.state_dict
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            break
    if any(k.startswith("encoder.down_blocks.") for k in state):
        return state
    if any(k.startswith("encoder.down.") for k in state):
        return ldm_keys.ldm_to_vae(state, config)
    raise CheckpointError(
        f"{checkpoint.path}: not a VAE (expected encoder.*/decoder.* weights in the original or diffusers layout, "
        "optionally under first_stage_model.)"
    )

