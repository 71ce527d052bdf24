"""SDXL: loading, two-encoder text conditioning, size conditioning, prediction and LoRA targets.

As sd-scripts' `sdxl_train_network.py`:
- the U-Net is conditioned on the penultimate hidden states of CLIP-L and OpenCLIP-bigG, concatenated, and
  on a "text_time" embedding of bigG's pooled, projected output plus six size numbers per image
  (Podell et al. 2023, "SDXL", §2.2: original size, crop top-left, target size, each (h, w));
- LoRA module names follow the original SGM U-Net (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`)
  because that is what ComfyUI, A1111/Forge, diffusers and sd-scripts read for SDXL; the text encoders are
  `lora_te1_` (CLIP-L) and `lora_te2_` (bigG);
- the noise schedule is SD's scaled_linear DDPM, epsilon or (with --v_parameterization) v-prediction.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lorakit.errors import ConfigError
from lorakit.families.base import AdapterTarget, Components, TextConditioning
from lorakit.families.common.text_cache import CaptionCache, whole_caption_cache
from lorakit.families.sd.family import TEXT_ENCODER_PARENTS, UNET_ATTENTION_PARENTS, UNET_CONV_PARENTS, rank_choice
from lorakit.families.targeting import RankChoice, collect_targets, kohya_name
from lorakit.objectives.ddpm import DDPMObjective
from lorakit.precision import load_dtype
from lorakit.transfer import to_device

log = logging.getLogger("lorakit")

TOKENS_PER_CHUNK = 77
BASE_MODEL_VERSION = "sdxl_base_v1-0"
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base"
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
DEFAULT_RESOLUTION = (1024, 1024)
TEXT_ENCODER_PREFIXES = ("lora_te1", "lora_te2")


class StableDiffusionXLFamily:
    """SDXL base 1.0 (and fine-tunes of it) with CLIP-L + OpenCLIP-bigG text encoders."""

    name = "sdxl"
    default_network_module = "networks.lora"  # sd-scripts' LoRA module for this family

    def __init__(self) -> None:
        self.vae_in_float32 = False
        self.text_cache: CaptionCache | None = None

    # -- loading -----------------------------------------------------------------------------------------

    def load(self, cfg: Any) -> Components:
        from lorakit.families.sdxl.loading import load_sdxl_components

        self._read_options(cfg)
        return load_sdxl_components(
            cfg.pretrained_model_name_or_path, v_parameterization=cfg.v_parameterization, vae_path=cfg.vae,
            dtype=load_dtype(cfg),
        )

    def _read_options(self, cfg: Any) -> None:
        """Remember the SDXL-specific switches that change how images and text are encoded."""
        if getattr(cfg, "v2", False):
            raise ConfigError(["--v2 selects an SD 2.x model; SDXL models take no --v2"])
        if getattr(cfg, "clip_skip", None):
            log.warning("--clip_skip is ignored for SDXL: it always uses the penultimate layer of both encoders")
        self.vae_in_float32 = bool(getattr(cfg, "no_half_vae", False))
        if getattr(cfg, "mixed_precision", "no") == "fp16" and not self.vae_in_float32:
            log.warning("the SDXL VAE overflows in fp16 (NaN latents are zeroed); add --no_half_vae to keep it in float32")
        self.text_cache = whole_caption_cache(cfg)

    def objective(self, cfg: Any, comps: Components) -> DDPMObjective:
        return DDPMObjective.from_options(cfg, "v_prediction" if cfg.v_parameterization else "epsilon")

    # -- images ------------------------------------------------------------------------------------------

    def encode_images(self, comps: Components, images: torch.Tensor) -> torch.Tensor:
        vae = self._vae(comps)
        latents = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample()
        # a NaN from an fp16 VAE would poison every later step; sd-scripts zeroes them the same way
        latents = torch.nan_to_num(latents, nan=0.0)
        return latents * vae.config.scaling_factor

    def decode_latents(self, comps: Components, latents: torch.Tensor) -> torch.Tensor:
        vae = self._vae(comps)
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample

    def _vae(self, comps: Components) -> torch.nn.Module:
        """The VAE, in float32 under --no_half_vae: the training loop already keeps it there; this covers callers
        that cast the whole model to one dtype themselves."""
        vae = comps.vae
        if self.vae_in_float32 and vae.dtype != torch.float32:
            vae.to(dtype=torch.float32)
        return vae

    # -- text --------------------------------------------------------------------------------------------

    def tokenize(self, comps: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids for CLIP-L (padded with the end token) and bigG (padded with "!", id 0)."""
        return tuple(
            tokenizer(captions, padding="max_length", max_length=TOKENS_PER_CHUNK, truncation=True, return_tensors="pt").input_ids
            for tokenizer in comps.tokenizers
        )

    def encode_text(self, comps: Components, captions: list[str], clip_skip: int | None = None) -> TextConditioning:
        """`encoder_hidden_states` (B, 77, w1 + w2) and `text_embeds` (B, projection) for the captions.

        `clip_skip` is ignored: SDXL was trained on the penultimate layers. With --cache_text_encoder_outputs
        each distinct caption is encoded once and reused (the encoders are frozen then).
        """
        def encode(texts: list[str]) -> dict[str, torch.Tensor]:
            hidden, pooled = self._run_encoders(comps, texts)
            return {"encoder_hidden_states": hidden, "text_embeds": pooled}

        return TextConditioning(encode(captions) if self.text_cache is None else self.text_cache.outputs(captions, encode))

    def _run_encoders(self, comps: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        te1, te2 = comps.text_encoders
        ids1, ids2 = self.tokenize(comps, captions)
        hidden1 = te1(to_device(ids1, te1.device), output_hidden_states=True).hidden_states[-2]
        out2 = te2(to_device(ids2, te2.device), output_hidden_states=True)
        hidden = torch.cat([hidden1, out2.hidden_states[-2].to(hidden1.dtype)], dim=-1)
        return hidden, out2.text_embeds

    # -- prediction --------------------------------------------------------------------------------------

    def predict(self, comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning, batch: Any) -> torch.Tensor:
        unet = comps.denoiser
        added = {
            "text_embeds": text.tensors["text_embeds"].to(device=noisy.device, dtype=noisy.dtype),
            "time_ids": to_device(size_time_ids(batch, noisy, vae_scale_factor(comps)), noisy.device, noisy.dtype),
        }
        context = text.tensors["encoder_hidden_states"].to(noisy.dtype)
        return unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample

    # -- adapters ----------------------------------------------------------------------------------------

    def kohya_module_path(self, comps: Components):
        """How U-Net module paths are renamed in file names (SGM layout), for adapters that walk the model."""
        return sgm_module_path(comps)

    def adapter_targets(self, comps: Components, cfg: Any) -> list[AdapterTarget]:
        ranks = rank_choice(cfg)
        targets: list[AdapterTarget] = []
        if not cfg.network_train_text_encoder_only:
            targets += unet_targets(comps.denoiser, ranks)
        if not cfg.network_train_unet_only:
            for prefix, encoder in zip(TEXT_ENCODER_PREFIXES, comps.text_encoders):
                # transformers 5 dropped the `text_model.` level from CLIPTextModel; kohya names keep it
                path_prefix = "" if hasattr(encoder, "text_model") else "text_model."
                targets += collect_targets(
                    encoder, prefix=prefix, component="text_encoder", parent_classes=TEXT_ENCODER_PARENTS,
                    ranks=ranks, path_prefix=path_prefix,
                )
        return targets

    def text_encoders_to_train(self, comps: Components, cfg: Any) -> list[torch.nn.Module]:
        return [] if cfg.network_train_unet_only else list(comps.text_encoders)

    def enable_gradient_checkpointing(self, comps: Components, train_text_encoder: bool) -> None:
        comps.denoiser.enable_gradient_checkpointing()
        if train_text_encoder:
            for encoder in comps.text_encoders:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def pipeline(self, comps: Components, sampler: str = "ddim") -> Any:
        """A diffusers SDXL pipeline over these very modules (LoRA applied to them shows in its output)."""
        from diffusers import StableDiffusionXLPipeline

        from lorakit.sampling.samplers import build_sampler

        te1, te2 = comps.text_encoders
        tok1, tok2 = comps.tokenizers
        return StableDiffusionXLPipeline(
            vae=self._vae(comps), text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
            unet=comps.denoiser, scheduler=build_sampler(sampler, comps.extras.get("prediction_type", "epsilon")),
        )

    # -- metadata ----------------------------------------------------------------------------------------

    def metadata(self, cfg: Any) -> dict[str, str]:
        return {"ss_base_model_version": BASE_MODEL_VERSION, "ss_v2": "False"}

    def modelspec_architecture(self, cfg: Any) -> tuple[str, str, tuple[int, int]]:
        """(architecture, implementation, default resolution) for the modelspec.* keys."""
        return MODELSPEC_ARCHITECTURE, MODELSPEC_IMPLEMENTATION, DEFAULT_RESOLUTION


def sgm_module_path(comps: Components):
    """diffusers U-Net module path -> SGM path, the layout SDXL kohya/LyCORIS file names use."""
    from lorakit.families.sdxl.sgm_keys import SgmUnetNames

    return SgmUnetNames(dict(comps.denoiser.config)).module


def unet_targets(unet: torch.nn.Module, ranks: RankChoice) -> list[AdapterTarget]:
    """The U-Net's LoRA targets (as the SD family chooses them), renamed to their SGM module paths."""
    from lorakit.families.sdxl.sgm_keys import SgmUnetNames

    targets = collect_targets(unet, prefix="lora_unet", component="unet", parent_classes=UNET_ATTENTION_PARENTS, ranks=ranks)
    if ranks.conv_rank:
        targets += collect_targets(
            unet, prefix="lora_unet", component="unet", parent_classes=UNET_CONV_PARENTS, ranks=ranks, include_spatial=True
        )
    names = SgmUnetNames(dict(unet.config))
    layers = ((path, m) for path, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    sgm_name = {kohya_name("lora_unet", path): kohya_name("lora_unet", names.module(path)) for path, _ in layers}
    return [AdapterTarget(sgm_name[t.name], t.module, t.component, t.rank, t.alpha) for t in targets]


def vae_scale_factor(comps: Components) -> int:
    """Pixels per latent cell: 8 for every SD-family VAE (three downsamplings)."""
    return 2 ** (len(comps.vae.config.block_out_channels) - 1)


def size_time_ids(batch: Any, latents: torch.Tensor, scale: int) -> torch.Tensor:
    """SDXL's micro-conditioning, one row per image: [orig_h, orig_w, crop_top, crop_left, target_h, target_w].

    Batches without size information (e.g. hand-built ones) are conditioned as uncropped images of the
    latents' pixel size, which is what SDXL sees for a square training image at its native size.
    """
    count = latents.shape[0]
    height, width = latents.shape[-2] * scale, latents.shape[-1] * scale
    originals = getattr(batch, "original_sizes", None) or [(height, width)] * count
    crops = getattr(batch, "crop_top_lefts", None) or [(0, 0)] * count
    targets = getattr(batch, "target_sizes", None) or [(height, width)] * count
    rows = [[*o, *c, *t] for o, c, t in zip(originals, crops, targets)]
    return torch.tensor(rows, dtype=torch.float32)
