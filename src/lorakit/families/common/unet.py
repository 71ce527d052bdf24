"""What the U-Net families (SD 1.x/2.x, SDXL) share: LoRA targets as sd-scripts' `networks.lora` chooses them, and
latents scaled by the VAE's `scaling_factor`."""

from __future__ import annotations

import logging

import torch
from torch import nn

from lorakit.adapters.targets import AdapterTarget, RankChoice, collect_targets
from lorakit.families.common.layers import to_fp8

log = logging.getLogger("lorakit")

#: the U-Net's Transformer2DModel linears (LoRA-LierLa), plus with conv_dim the ResNet blocks and samplers (C3Lier)
UNET_ATTENTION_PARENTS = ("Transformer2DModel",)
UNET_CONV_PARENTS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


def unet_targets(unet: nn.Module, ranks: RankChoice) -> list[AdapterTarget]:
    """The U-Net's LoRA targets under `lora_unet`, named after their diffusers paths."""
    targets = collect_targets(unet, prefix="lora_unet", component="unet", parent_classes=UNET_ATTENTION_PARENTS, ranks=ranks)
    if ranks.conv_rank:
        targets += collect_targets(
            unet, prefix="lora_unet", component="unet", parent_classes=UNET_CONV_PARENTS, ranks=ranks, include_spatial=True
        )
    return targets


def encode_scaled(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pixels -> latents × scaling_factor. A NaN from an fp16 VAE would poison every later step; sd-scripts
    zeroes them the same way."""
    latents = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample()
    return torch.nan_to_num(latents, nan=0.0) * vae.config.scaling_factor


def decode_scaled(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample


def gradient_checkpointing(unet: nn.Module, encoders: list[nn.Module]) -> None:
    """Checkpointing in the U-Net and in the text encoders that train (non-reentrant, as transformers advises)."""
    unet.enable_gradient_checkpointing()
    for encoder in encoders:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def store_fp8(unet: nn.Module, encoders: list[nn.Module], parts: str | None) -> None:
    """sd-scripts' `--fp8_base` on a U-Net model: the U-Net's weights in float8_e4m3fn (its linears and
    convolutions; norms and biases keep the training dtype), with `parts` "all" the text encoders' linears too
    (their embeddings stay, as sd-scripts puts them back into the training dtype). Each layer upcasts its weight
    per call; adapters read the upcast weight (`adapters.base.base_weight`)."""
    if parts is None:
        return
    layers = to_fp8(unet, convolutions=True)
    if parts == "all":
        layers += sum(to_fp8(encoder) for encoder in encoders)
    log.info("--fp8_base: %d layers store float8_e4m3fn weights", layers)
