"""Z-Image (Turbo and base): loading, conditioning, flow-matching prediction, LoRA targets and files.

As diffusers' ZImagePipeline and musubi-tuner's `zimage_train_network.py` (the reference trainer):
- latents are FLUX.1's autoencoder's, normalised as (z − shift)·scale;
- the caption features are Qwen3's second-to-last hidden states of the caption in its chat template
  (`prompts.py`), one unpadded row per image, as the transformer takes them;
- the transformer takes the latents as (C, 1, H, W) per image and t = 1 − σ, and predicts x₀ − ε, the negative of
  the velocity ε − x₀ the objective compares (the pipeline negates it the same way);
- LoRA targets follow `networks.lora_zimage` (the main blocks' attention and feed-forward), saved under ComfyUI's
  names with q/k/v fused (`lora_unet_layers_0_attention_qkv`), which ComfyUI loads as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters.spec import TargetSpec
from lorakit.adapters.targets import AdapterTarget
from lorakit.data.latent_files import LatentFileFormat
from lorakit.data.text_cache import CaptionCache, run_text_cache
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
from lorakit.families.common.transformer_family import (
    BlockSwapFamily,
    ShiftScaleLatents,
)
from lorakit.families.z_image.lora_keys import LORA_LAYOUT
from lorakit.families.z_image.targets import ATTENTION, transformer_targets
from lorakit.objectives.flow import timesteps_to_sigmas

log = logging.getLogger("lorakit")

BASE_MODEL_VERSION = "z_image"
ARCHITECTURE = "Z-Image"  # musubi-tuner's modelspec.architecture
IMPLEMENTATION = "https://github.com/Tongyi-MAI/Z-Image"
PATCH = 2


class ZImageFamily(LanguageModelConditioned, ShiftScaleLatents, BlockSwapFamily, ModelFamily):
    """Z-Image with its Qwen3 text encoder and FLUX.1's autoencoder."""

    encoder_title = "Qwen3"
    swap_blocks_attribute = "layers"
    name = "z_image"
    title = "Z-Image"
    large_text_encoders = (0,)  # what --base_quant quantizes besides the denoiser
    default_network_module = "networks.lora_zimage"
    lora_network_modules = ("networks.lora_zimage",)
    bucket_step = 16  # 8× autoencoder, then 2×2 patches
    oft_attention = ATTENTION
    lora_hints = (LoraHint(14, ("lora_unet_layers_", "lora_unet_noise_refiner_", "lora_unet_context_refiner_",
                                "noise_refiner.", "context_refiner.", "attention.to_out.0.", "feed_forward.w1.")),)
    version_prefixes = ("z_image",)
    architecture_fragments = ("Z-Image",)
    inference = InferenceDefaults(steps=8, guidance_scale=0.0, resolution=1024)  # Z-Image-Turbo's
    part_files = ("text_encoder", "vae")
    single_file_kinds = ("safetensors", "diffusers")  # "diffusers": the transformer alone under diffusers' names
    save_formats = ("kohya", "diffusers")
    uses_own_scheduler = True
    webui_kohya = "no (A1111 and Forge have no Z-Image; Forge Neo's loader was not checked)"
    webui_diffusers = "no (A1111 and Forge have no Z-Image; Forge Neo's loader was not checked)"
    diffusers_kohya = "no (convert: lorakit lora convert --to diffusers, or train with --save_format diffusers)"

    def __init__(self) -> None:
        self.text_cache: CaptionCache | None = None

    @property
    def latent_format(self) -> LatentFileFormat:
        # the autoencoder's sample before shift and scale, as FLUX.1's caches
        return LatentFileFormat("_z_image.npz", True, 0.3611, 0.1159)

    @property
    def text_cache_format(self) -> TextFileFormat:
        # lorakit's own files (sd-scripts has no Z-Image): the caption's real tokens and their mask
        return TextFileFormat("_zimage_te.npz", ("text", "text_mask"), encoder_files=("text_encoder",),
                              ragged_mask="text_mask")

    @property
    def lora_layout(self):
        return LORA_LAYOUT

    def owns_checkpoint(self, path: str) -> bool:
        from lorakit.families.z_image.detect import is_z_image_source

        return is_z_image_source(path)

    # ----------------------------------------------------------------------------------------- loading

    def load(self, cfg: Any, spec: TargetSpec | None = None, text_cache: CaptionCache | None = None) -> Components:
        self.text_cache = run_text_cache(cfg, text_cache, self.text_cache_format)
        comps = self.load_model(self.training_source(cfg, self.text_cache))
        comps.extras["cpu_offload_checkpointing"] = bool(cfg.cpu_offload_checkpointing)
        self._check_block_swap(cfg, comps)
        return comps

    def load_model(self, source: ModelSource) -> Components:
        from lorakit.families.z_image.loading import (
            load_transformer,
            load_z_image_components,
        )

        dtype = source.dtype or torch.float32
        if source.denoiser_only or (source.partial and not Path(source.path).is_dir()):
            comps = Components(load_transformer(Path(source.path), dtype).eval(), None, [None], [], {"source": source.path})
        else:
            files = source.files
            comps = load_z_image_components(source.path, text_encoder=files.get("text_encoder"), vae=files.get("vae"),
                                            dtype=dtype, text_encoders=source.text_encoders)
        store_fp8(comps, source)
        return comps

    # ----------------------------------------------------------------------------------------- text and prediction

    def encode_text(self, comps: Components, captions: list[str], clip_skip: int | None = None) -> TextConditioning:
        """Qwen3's caption features and their mask (`clip_skip` does not apply)."""
        if self.text_cache is not None:
            return TextConditioning(self.text_cache.outputs(captions, lambda texts: self.text_encoder_outputs(comps, texts)))
        return TextConditioning(self.text_encoder_outputs(comps, captions))

    def text_encoder_outputs(self, comps: Components, captions: list[str], clip_skip: int | None = None
                             ) -> dict[str, torch.Tensor]:
        """Qwen3's caption features (`text`) and the mask of the real tokens (`text_mask`)."""
        from lorakit.families.z_image.prompts import encode_prompts

        with torch.no_grad():
            text, mask = encode_prompts(comps.text_encoders[0], comps.tokenizers[0], captions)
        return {"text": text, "text_mask": mask}

    def predict(self, comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning, batch: Any) -> torch.Tensor:
        """The velocity ε − x₀: the negated output of the transformer, which predicts x₀ − ε at t = 1 − σ."""
        self.prepare_block_swap(comps, None, noisy.device)  # once, with --blocks_to_swap
        features, mask = text.tensors["text"].to(noisy.device, noisy.dtype), text.tensors["text_mask"].to(noisy.device).bool()
        t = (1.0 - timesteps_to_sigmas(timesteps)).to(noisy.dtype)
        output = comps.denoiser(list(noisy.unsqueeze(2).unbind(0)), t, [row[keep] for row, keep in zip(features, mask)],
                                return_dict=False)[0]
        return -torch.stack(output, dim=0).squeeze(2)

    # ----------------------------------------------------------------------------------------- adapters

    def adapter_targets(self, comps: Components, spec: TargetSpec) -> list[AdapterTarget]:
        if not spec.train_unet:
            return []
        return transformer_targets(comps.denoiser, spec.rank, spec.alpha_option or None)

    def lycoris_denoiser_targets(self, comps: Components, spec: TargetSpec, preset_classes: set[str]) -> list[AdapterTarget]:
        """LyCORIS adapts the layers `networks.lora_zimage` does, under ComfyUI's names (fused q/k/v)."""
        return self.adapter_targets(comps, spec)

    def text_encoders_to_train(self, comps: Components, spec: TargetSpec) -> list[torch.nn.Module]:
        return []

    def enable_gradient_checkpointing(self, comps: Components, train_text_encoder: bool) -> None:
        if comps.extras.get("cpu_offload_checkpointing"):
            comps.denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_offloading_to_cpu)
        else:
            comps.denoiser.enable_gradient_checkpointing()

    def pipeline(self, comps: Components, sampler: str | None = None) -> Any:
        """diffusers' ZImagePipeline over these very modules; it samples with Z-Image's flow scheduler whatever
        `sampler` says."""
        from diffusers import ZImagePipeline

        from lorakit.families.z_image.loading import flow_scheduler

        return ZImagePipeline(scheduler=flow_scheduler(), vae=comps.vae, text_encoder=comps.text_encoders[0],
                              tokenizer=comps.tokenizers[0], transformer=comps.denoiser)

    def lora_file_state(self, state: dict[str, torch.Tensor], metadata: dict[str, str], save_format: str
                        ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """kohya (ComfyUI's names), or with --save_format diffusers the diffusers/PEFT layout diffusers loads."""
        if save_format != "diffusers":
            return state, metadata
        from lorakit.families.z_image.lora_convert import kohya_to_diffusers

        return kohya_to_diffusers(state, metadata)

    def lora_to_diffusers(self, state, metadata, *, keep_alpha: bool = False):
        from lorakit.families.z_image.lora_convert import kohya_to_diffusers

        return kohya_to_diffusers(state, metadata, keep_alpha=keep_alpha)

    def lora_from_diffusers(self, state, metadata):
        from lorakit.families.z_image.lora_convert import diffusers_to_kohya

        return diffusers_to_kohya(state, metadata)

    def loader_support(self, style: str, algorithm: str, keys: list[str], **flags: Any) -> dict[str, str]:
        """As the other families, except that sd-scripts has no Z-Image: its sibling musubi-tuner is the reference."""
        support = super().loader_support(style, algorithm, keys, **flags)
        if style == "kohya":
            support["sd-scripts"] = "no (sd-scripts has no Z-Image; musubi-tuner reads it after its convert_z_image_lora_to_comfy.py --reverse)"
        return support

    # ----------------------------------------------------------------------------------------- metadata

    def metadata(self, cfg: Any) -> dict[str, str]:
        return {
            "ss_base_model_version": BASE_MODEL_VERSION,
            "ss_v2": "False",
            **flow_sampling_metadata(cfg),
        }

    def base_model(self, version: str | None, *, variant: str | None = None, v_prediction: bool = False) -> BaseModelFacts:
        """musubi-tuner's ModelSpec: `Z-Image`, 1024 px, no prediction type."""
        return BaseModelFacts(BASE_MODEL_VERSION, ARCHITECTURE, IMPLEMENTATION, 1024, None)

    # ----------------------------------------------------------------------------------------- whole-model files

    def save_single_file(self, comps: Components, path: Path, kind: str) -> None:
        """The transformer alone in ComfyUI's layout (`kind` "diffusers": under diffusers' names)."""
        from lorakit.families.z_image.model_files import save_transformer_file

        save_transformer_file(comps.denoiser, path, layout="diffusers" if kind == "diffusers" else "comfy")

    def save_folder(self, comps: Components, path: Path) -> None:
        from lorakit.checkpoint_io import save_pipeline_atomic

        if comps.vae is None or comps.text_encoders[0] is None or not comps.tokenizers:
            raise ConfigError([f"--save_to {path}: a diffusers folder needs the whole pipeline; this Z-Image model was "
                               "read from single files, so save it as .safetensors"])
        save_pipeline_atomic(self.pipeline(comps), path)
