"""Qwen-Image and Qwen-Image-Edit: loading, conditioning, flow-matching prediction, LoRA targets and files.

As diffusers' QwenImagePipeline / QwenImageEditPipeline and musubi-tuner's `qwen_image_train_network.py` (the
reference trainer):
- latents are the Qwen-Image VAE's (a Wan-style VAE with one frame), normalised per channel by the VAE's
  `latents_mean`/`latents_std`, and packed into 2×2 patches (64 features per token);
- the text tokens are Qwen2.5-VL's last hidden states of the caption in the model's template (`prompts.py`),
  masked where a batch pads them;
- the transformer gets σ (timesteps / 1000) and the token grid `img_shapes`, and predicts the velocity ε − x₀;
- Edit: the reference image's latents (VAE mode, normalised, packed) follow the noisy tokens in the same sequence,
  with their own grid in `img_shapes`, the reference image also goes through Qwen2.5-VL with the Edit template,
  and only the noisy tokens' outputs are compared;
- LoRA targets follow `networks.lora_qwen_image` with diffusers' names (`lora_unet_transformer_blocks_0_attn_to_q`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters.spec import TargetSpec
from lorakit.adapters.targets import AdapterTarget
from lorakit.data.latent_files import LatentFileFormat
from lorakit.data.text_cache import CaptionCache, caches_text, run_text_cache
from lorakit.data.text_files import TextFileFormat
from lorakit.errors import ConfigError
from lorakit.families.base import (
    BaseModelFacts,
    Components,
    InferenceDefaults,
    LoraHint,
    ModelFamily,
    ModelSource,
    TextConditioning,
)
from lorakit.families.common.flow_metadata import flow_sampling_metadata
from lorakit.families.common.layers import checkpoint_offloading_to_cpu
from lorakit.families.common.llm_family import LanguageModelConditioned, store_fp8
from lorakit.families.common.packing import PATCH, pack_latents, unpack_latents
from lorakit.families.common.transformer_family import BlockSwapFamily
from lorakit.families.qwen_image.lora_keys import LORA_LAYOUT
from lorakit.families.qwen_image.targets import ATTENTION, transformer_targets
from lorakit.objectives.flow import timesteps_to_sigmas

log = logging.getLogger("lorakit")

BASE_MODEL_VERSION = "qwen_image"
IMPLEMENTATION = "https://github.com/QwenLM/Qwen-Image"  # musubi-tuner's modelspec.implementation
ARCHITECTURES = {None: ("Qwen-Image", 1328), "edit": ("Qwen-Image-Edit", 1024)}  # musubi-tuner's names and sizes


class QwenImageFamily(LanguageModelConditioned, BlockSwapFamily, ModelFamily):
    """Qwen-Image (text to image) and Qwen-Image-Edit (reference image + instruction) with Qwen2.5-VL."""

    encoder_title = "Qwen2.5-VL"
    name = "qwen_image"
    title = "Qwen-Image"
    large_text_encoders = (0,)  # what --base_quant quantizes besides the denoiser
    default_network_module = "networks.lora_qwen_image"
    lora_network_modules = ("networks.lora_qwen_image",)
    bucket_step = 16  # 8× VAE, then 2×2 patches
    oft_attention = ATTENTION
    lora_hints = (LoraHint(12, ("lora_unet_transformer_blocks_", "img_mlp.", "txt_mlp.")),)
    version_prefixes = ("qwen_image",)
    architecture_fragments = ("Qwen-Image",)
    inference = InferenceDefaults(steps=30, guidance_scale=4.0, resolution=1024)
    part_files = ("text_encoder", "vae")
    single_file_kinds = ("safetensors",)
    uses_own_scheduler = True
    webui_kohya = "no (A1111 and Forge have no Qwen-Image; Forge Neo's loader was not checked)"
    webui_diffusers = "no (A1111 and Forge have no Qwen-Image; Forge Neo's loader was not checked)"

    def __init__(self) -> None:
        self.text_cache: CaptionCache | None = None

    @property
    def latent_format(self) -> LatentFileFormat:
        # model-ready latents (normalised per channel by the VAE's statistics) are stored as they are
        return LatentFileFormat("_qwen_image.npz", True)

    @property
    def text_cache_format(self) -> TextFileFormat:
        # lorakit's own files (sd-scripts has no Qwen-Image): the caption's real tokens and their mask
        return TextFileFormat("_qwen_image_te.npz", ("text", "text_mask"), encoder_files=("text_encoder",),
                              ragged_mask="text_mask")

    @property
    def lora_layout(self):
        return LORA_LAYOUT

    def owns_checkpoint(self, path: str) -> bool:
        from lorakit.families.qwen_image.detect import is_qwen_image_source

        return is_qwen_image_source(path)

    def option_problems(self, cfg: Any, spec: TargetSpec | None = None) -> list[str]:
        problems = super().option_problems(cfg, spec)
        if caches_text(cfg) and trains_edit(cfg):
            problems.append("--cache_text_encoder_outputs cannot be used with --model_version edit: the Edit model "
                            "encodes each caption with its reference image")
        return problems

    def conditioning_use(self, cfg: Any) -> Any:
        """Edit trains on pairs: every subset gives each image its reference (`conditioning_data_dir`)."""
        from lorakit.data.conditioning import ConditioningUse

        return ConditioningUse.REQUIRED if trains_edit(cfg) else super().conditioning_use(cfg)

    # ----------------------------------------------------------------------------------------- loading

    def load(self, cfg: Any, spec: TargetSpec | None = None, text_cache: CaptionCache | None = None) -> Components:
        self.text_cache = None if trains_edit(cfg) else run_text_cache(cfg, text_cache, self.text_cache_format)
        comps = self.load_model(self.training_source(cfg, self.text_cache, variant=cfg.model_version))
        comps.extras["cpu_offload_checkpointing"] = bool(cfg.cpu_offload_checkpointing)
        self._check_block_swap(cfg, comps)
        return comps

    def load_model(self, source: ModelSource) -> Components:
        from lorakit.families.qwen_image.loading import load_qwen_image_components
        from lorakit.families.qwen_image.model_files import load_transformer_alone

        dtype = source.dtype or torch.float32
        edit = None if source.variant is None else source.variant == "edit"
        if source.denoiser_only or (source.partial and not Path(source.path).is_dir()):
            comps = load_transformer_alone(source.path, dtype, bool(edit))
        else:
            files = source.files
            comps = load_qwen_image_components(source.path, text_encoder=files.get("text_encoder"), vae=files.get("vae"),
                                               dtype=dtype, edit=edit, text_encoders=source.text_encoders)
        store_fp8(comps, source)
        return comps

    # ----------------------------------------------------------------------------------------- images and text

    def encode_images(self, comps: Components, images: torch.Tensor, sample: bool = True) -> torch.Tensor:
        vae = comps.vae
        dist = vae.encode(images.to(device=vae.device, dtype=vae.dtype).unsqueeze(2)).latent_dist
        latents = (dist.sample() if sample else dist.mode())[:, :, 0]
        mean, std = _statistics(vae, latents)
        return (latents - mean) / std

    def decode_latents(self, comps: Components, latents: torch.Tensor) -> torch.Tensor:
        vae = comps.vae
        mean, std = _statistics(vae, latents)
        return vae.decode((latents * std + mean).to(vae.dtype).unsqueeze(2)).sample[:, :, 0]

    def encode_text(self, comps: Components, captions: list[str], clip_skip: int | None = None,
                    references: torch.Tensor | None = None) -> TextConditioning:
        """Qwen2.5-VL's text tokens and their mask (`clip_skip` does not apply). Edit encodes each caption with its
        reference image, which the training step hands over with the batch (`predict`)."""
        if comps.extras.get("edit"):
            return TextConditioning({"captions_only": torch.zeros(len(captions))}) if references is None else \
                TextConditioning(self._encode(comps, captions, references))
        if self.text_cache is not None:
            return TextConditioning(self.text_cache.outputs(captions, lambda texts: self.text_encoder_outputs(comps, texts)))
        return TextConditioning(self._encode(comps, captions, None))

    def text_encoder_outputs(self, comps: Components, captions: list[str], clip_skip: int | None = None
                             ) -> dict[str, torch.Tensor]:
        """Qwen2.5-VL's caption tokens (`text`) and the mask of the real ones (`text_mask`)."""
        return self._encode(comps, captions, None)

    @staticmethod
    def _encode(comps: Components, captions: list[str], references: torch.Tensor | None) -> dict[str, torch.Tensor]:
        from lorakit.families.qwen_image.prompts import VLInputs, encode_prompts

        inputs = VLInputs(comps.tokenizers[0], comps.extras.get("image_processor"))
        with torch.no_grad():
            text, mask = encode_prompts(comps.text_encoders[0], inputs, captions, references)
        return {"text": text, "text_mask": mask}

    # ----------------------------------------------------------------------------------------- prediction

    def predict(self, comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning, batch: Any) -> torch.Tensor:
        """The transformer's velocity for the noisy latents (Edit: with the batch's reference images)."""
        self.prepare_block_swap(comps, None, noisy.device)  # once, with --blocks_to_swap
        references = reference_pixels(batch) if comps.extras.get("edit") else None
        if comps.extras.get("edit") and references is None:
            raise ConfigError(["Qwen-Image-Edit trains on pairs: give each image its reference with the dataset's "
                               "conditioning_data_dir (or train --model_version original)"])
        if references is not None:
            with torch.no_grad():
                text = TextConditioning(self._encode(comps, batch.captions, references))
                reference_latents = self.encode_images(comps, references.to(noisy.device), sample=False).to(noisy.dtype)
        else:
            reference_latents = None
        return self.velocity(comps, noisy, timesteps, text, reference_latents)

    @staticmethod
    def velocity(comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
                 reference_latents: torch.Tensor | None = None) -> torch.Tensor:
        _, _, height, width = noisy.shape
        tokens = pack_latents(noisy)
        shapes = [(1, height // PATCH, width // PATCH)]
        if reference_latents is not None:
            tokens = torch.cat([tokens, pack_latents(reference_latents)], dim=1)
            shapes.append((1, reference_latents.shape[2] // PATCH, reference_latents.shape[3] // PATCH))
        mask = text.tensors["text_mask"].to(noisy.device).bool()
        output = comps.denoiser(
            hidden_states=tokens, encoder_hidden_states=text.tensors["text"].to(noisy.device, noisy.dtype),
            encoder_hidden_states_mask=mask, timestep=timesteps_to_sigmas(timesteps).to(noisy.dtype),
            img_shapes=[shapes] * noisy.shape[0], return_dict=False,
        )[0]
        return unpack_latents(output[:, : (height // PATCH) * (width // PATCH)], height, width)

    # ----------------------------------------------------------------------------------------- adapters

    def adapter_targets(self, comps: Components, spec: TargetSpec) -> list[AdapterTarget]:
        if not spec.train_unet:
            return []
        return transformer_targets(comps.denoiser, spec.rank, spec.alpha_option or None)

    def lycoris_denoiser_targets(self, comps: Components, spec: TargetSpec, preset_classes: set[str]) -> list[AdapterTarget]:
        """LyCORIS adapts the layers `networks.lora_qwen_image` does, so its files name what ComfyUI loads."""
        return self.adapter_targets(comps, spec)

    def text_encoders_to_train(self, comps: Components, spec: TargetSpec) -> list[torch.nn.Module]:
        return []

    def enable_gradient_checkpointing(self, comps: Components, train_text_encoder: bool) -> None:
        if comps.extras.get("cpu_offload_checkpointing"):
            comps.denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_offloading_to_cpu)
        else:
            comps.denoiser.enable_gradient_checkpointing()

    def pipeline(self, comps: Components, sampler: str | None = None) -> Any:
        """diffusers' QwenImagePipeline over these very modules (an attached LoRA shows in its images); it samples
        with Qwen-Image's own flow scheduler whatever `sampler` says. An Edit model samples from text alone."""
        from diffusers import QwenImagePipeline

        from lorakit.families.qwen_image.loading import flow_scheduler

        return QwenImagePipeline(scheduler=flow_scheduler(), vae=comps.vae, text_encoder=comps.text_encoders[0],
                                 tokenizer=comps.tokenizers[0], transformer=comps.denoiser)

    def loader_support(self, style: str, algorithm: str, keys: list[str], **flags: Any) -> dict[str, str]:
        """As the other families, except that sd-scripts has no Qwen-Image: its sibling musubi-tuner is the reference."""
        support = super().loader_support(style, algorithm, keys, **flags)
        if style == "kohya":
            support["sd-scripts"] = "no (sd-scripts has no Qwen-Image; musubi-tuner reads it as it is)"
        return support

    # ----------------------------------------------------------------------------------------- metadata

    def metadata(self, cfg: Any) -> dict[str, str]:
        return {
            "ss_base_model_version": BASE_MODEL_VERSION,
            "ss_v2": "False",
            **flow_sampling_metadata(cfg),
        }

    def base_model(self, version: str | None, *, variant: str | None = None, v_prediction: bool = False) -> BaseModelFacts:
        """musubi-tuner's ModelSpec: `Qwen-Image` (1328 px) or `Qwen-Image-Edit` (1024 px), no prediction type."""
        architecture, resolution = ARCHITECTURES.get(variant, ARCHITECTURES[None])
        return BaseModelFacts(BASE_MODEL_VERSION, architecture, IMPLEMENTATION, resolution, None)

    def model_variant(self, comps: Components) -> str | None:
        return "edit" if comps.extras.get("edit") else None

    def variant_of_architecture(self, architecture: str) -> str | None:
        return "edit" if architecture.startswith("Qwen-Image-Edit") else None

    # ----------------------------------------------------------------------------------------- whole-model files

    def save_single_file(self, comps: Components, path: Path, kind: str) -> None:
        """The transformer alone, under diffusers' names (ComfyUI's `qwen_image_bf16.safetensors` layout)."""
        from lorakit.families.qwen_image.model_files import save_transformer_file

        save_transformer_file(comps.denoiser, path)

    def save_folder(self, comps: Components, path: Path) -> None:
        from lorakit.checkpoint_io import save_pipeline_atomic

        if comps.vae is None or comps.text_encoders[0] is None or not comps.tokenizers:
            raise ConfigError([f"--save_to {path}: a diffusers folder needs the whole pipeline; this Qwen-Image model "
                               "was read from single files, so save it as .safetensors"])
        save_pipeline_atomic(self.pipeline(comps), path)


def trains_edit(cfg: Any) -> bool:
    """--model_version edit, or a diffusers folder of QwenImageEditPipeline without --model_version."""
    from lorakit.families.qwen_image.detect import pipeline_is_edit

    if cfg.model_version is not None:
        return cfg.model_version == "edit"
    source = Path(cfg.pretrained_model_name_or_path or "")
    return source.is_dir() and pipeline_is_edit(source)


def reference_pixels(batch: Any) -> torch.Tensor | None:
    """The batch's reference images (pixels in [-1, 1]), from the dataset's conditioning_data_dir."""
    return getattr(batch, "conditioning_images", None)


def _statistics(vae: torch.nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
    return mean, std
