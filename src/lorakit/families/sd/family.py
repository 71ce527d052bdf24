"""Stable Diffusion 1.x / 2.x: loading, conditioning, prediction and LoRA targets.

Targets follow sd-scripts' `networks.lora`: the U-Net's Transformer2DModel linears (LoRA-LierLa), plus with
`conv_dim` the ResNet blocks and up/down-samplers (LoRA-C3Lier); the text encoder's attention and MLP linears.
"""

from __future__ import annotations

from typing import Any

import torch

from lorakit.errors import ConfigError
from lorakit.families.base import AdapterTarget, Components, TextConditioning
from lorakit.families.common.text_cache import CaptionCache, whole_caption_cache
from lorakit.families.targeting import RankChoice, collect_targets
from lorakit.objectives.ddpm import DDPMObjective
from lorakit.precision import load_dtype
from lorakit.transfer import to_device

UNET_ATTENTION_PARENTS = ("Transformer2DModel",)
UNET_CONV_PARENTS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_PARENTS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
TOKENS_PER_CHUNK = 77


class StableDiffusionFamily:
    """SD 1.x and 2.x (epsilon or v-prediction) with one CLIP text encoder."""

    name = "sd"
    default_network_module = "networks.lora"  # sd-scripts' LoRA module for this family

    def __init__(self) -> None:
        self.text_cache: CaptionCache | None = None

    def load(self, cfg: Any) -> Components:
        from lorakit.families.sd.loading import load_sd_components

        # sd-scripts has no text-encoder cache for SD 1.x/2.x (its option is SDXL's); here the same option
        # saves running the frozen encoder on the same captions every step
        self.text_cache = whole_caption_cache(cfg)
        return load_sd_components(
            cfg.pretrained_model_name_or_path, v2=cfg.v2, v_parameterization=cfg.v_parameterization, vae_path=cfg.vae,
            dtype=load_dtype(cfg),
        )

    def objective(self, cfg: Any, comps: Components) -> DDPMObjective:
        return DDPMObjective.from_options(cfg, "v_prediction" if cfg.v_parameterization else "epsilon")

    def encode_images(self, comps: Components, images: torch.Tensor) -> torch.Tensor:
        vae = comps.vae
        latents = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample()
        # a NaN from an fp16 VAE would poison every later step; sd-scripts zeroes them the same way
        latents = torch.nan_to_num(latents, nan=0.0)
        return latents * vae.config.scaling_factor

    def decode_latents(self, comps: Components, latents: torch.Tensor) -> torch.Tensor:
        vae = comps.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample

    def tokenize(self, comps: Components, captions: list[str]) -> torch.Tensor:
        tokenizer = comps.tokenizers[0]
        return tokenizer(
            captions, padding="max_length", max_length=TOKENS_PER_CHUNK, truncation=True, return_tensors="pt"
        ).input_ids

    def encode_text(self, comps: Components, captions: list[str], clip_skip: int | None = None) -> TextConditioning:
        """`encoder_hidden_states` (B, 77, width); with --cache_text_encoder_outputs each distinct caption is
        encoded once and reused (the encoder is frozen then)."""
        def encode(texts: list[str]) -> dict[str, torch.Tensor]:
            return {"encoder_hidden_states": self._run_encoder(comps, texts, clip_skip)}

        return TextConditioning(encode(captions) if self.text_cache is None else self.text_cache.outputs(captions, encode))

    def _run_encoder(self, comps: Components, captions: list[str], clip_skip: int | None) -> torch.Tensor:
        encoder = comps.text_encoders[0]
        ids = to_device(self.tokenize(comps, captions), encoder.device)
        if not clip_skip or clip_skip <= 1:
            return encoder(ids).last_hidden_state
        # the n-th layer from the end, normalised like the last one (what A1111 "CLIP skip" means)
        states = encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
        return _final_layer_norm(encoder)(states)

    def predict(self, comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning, batch: Any) -> torch.Tensor:
        unet = comps.denoiser
        context = text.tensors["encoder_hidden_states"].to(noisy.dtype)
        return unet(noisy, timesteps, encoder_hidden_states=context).sample

    def adapter_targets(self, comps: Components, cfg: Any) -> list[AdapterTarget]:
        ranks = rank_choice(cfg)
        targets: list[AdapterTarget] = []
        if not cfg.network_train_text_encoder_only:
            unet = comps.denoiser
            targets += collect_targets(unet, prefix="lora_unet", component="unet", parent_classes=UNET_ATTENTION_PARENTS, ranks=ranks)
            if ranks.conv_rank:
                targets += collect_targets(
                    unet, prefix="lora_unet", component="unet", parent_classes=UNET_CONV_PARENTS, ranks=ranks, include_spatial=True
                )
        if not cfg.network_train_unet_only:
            encoder = comps.text_encoders[0]
            # transformers 5 dropped the `text_model.` level from CLIPTextModel; kohya names keep it
            path_prefix = "" if hasattr(encoder, "text_model") else "text_model."
            targets += collect_targets(
                encoder, prefix="lora_te", component="text_encoder", parent_classes=TEXT_ENCODER_PARENTS, ranks=ranks, path_prefix=path_prefix
            )
        return targets

    def text_encoders_to_train(self, comps: Components, cfg: Any) -> list[torch.nn.Module]:
        return [] if cfg.network_train_unet_only else list(comps.text_encoders)

    def enable_gradient_checkpointing(self, comps: Components, train_text_encoder: bool) -> None:
        comps.denoiser.enable_gradient_checkpointing()
        if train_text_encoder:
            comps.text_encoders[0].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def pipeline(self, comps: Components, sampler: str = "ddim") -> Any:
        """A diffusers pipeline over these very modules (LoRA applied to them shows in its output)."""
        from diffusers import StableDiffusionPipeline

        from lorakit.sampling.samplers import build_sampler

        return StableDiffusionPipeline(
            vae=comps.vae, text_encoder=comps.text_encoders[0], tokenizer=comps.tokenizers[0], unet=comps.denoiser,
            scheduler=build_sampler(sampler, comps.extras.get("prediction_type", "epsilon")),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    def metadata(self, cfg: Any) -> dict[str, str]:
        version = "sd_v2" if cfg.v2 else "sd_v1"
        if cfg.v_parameterization:
            version += "_v"
        return {"ss_base_model_version": version, "ss_v2": str(bool(cfg.v2))}

    def modelspec_architecture(self, cfg: Any) -> tuple[str, str, tuple[int, int]]:
        """(architecture, implementation, default resolution) for the modelspec.* keys."""
        if not cfg.v2:
            return "stable-diffusion-v1", "diffusers", (512, 512)
        if cfg.v_parameterization:
            return "stable-diffusion-v2-768-v", "diffusers", (768, 768)
        return "stable-diffusion-v2-512", "diffusers", (512, 512)


def _final_layer_norm(encoder: torch.nn.Module) -> torch.nn.Module:
    owner = getattr(encoder, "text_model", encoder)
    return owner.final_layer_norm


def rank_choice(cfg: Any) -> RankChoice:
    """network_dim/alpha and the C3Lier conv_dim/conv_alpha from --network_args (sd-scripts defaults)."""
    kwargs = cfg.network_kwargs() if hasattr(cfg, "network_kwargs") else {}
    rank = cfg.network_dim or 4
    alpha = cfg.network_alpha if cfg.network_alpha else float(rank)
    conv_rank = conv_alpha = None
    if "conv_dim" in kwargs:
        try:
            conv_rank = int(kwargs["conv_dim"])
            conv_alpha = float(kwargs.get("conv_alpha", 1.0))
        except ValueError as exc:
            raise ConfigError([f"--network_args conv_dim/conv_alpha must be numbers (got {kwargs})"]) from exc
    return RankChoice(rank, alpha, conv_rank, conv_alpha)
