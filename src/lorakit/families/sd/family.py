"""Stable Diffusion 1.x / 2.x: loading, conditioning, prediction, LoRA targets and files.

Targets follow sd-scripts' `networks.lora`: the U-Net's Transformer2DModel linears (LoRA-LierLa), plus with
`conv_dim` the ResNet blocks and up/down-samplers (LoRA-C3Lier); the text encoder's attention and MLP linears.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters.spec import TargetSpec
from lorakit.adapters.targets import AdapterTarget
from lorakit.data.latent_files import LatentFileFormat
from lorakit.data.text_cache import CaptionCache, run_text_cache
from lorakit.data.text_files import TextFileFormat
from lorakit.families.base import (
    BaseModelFacts,
    Components,
    InferenceDefaults,
    LoraHint,
    ModelFamily,
    ModelSource,
    TextConditioning,
)
from lorakit.families.common.clip_prompts import ClipPrompts, encoder_ids
from lorakit.families.common.headers import safetensors_keys
from lorakit.families.common.prediction import prediction_type_warnings
from lorakit.families.common.text_cache import whole_cache_problems
from lorakit.families.common.text_encoders import clip_targets
from lorakit.families.common.layers import fp8_parts
from lorakit.families.common.unet import decode_scaled, encode_scaled, gradient_checkpointing, store_fp8, unet_targets
from lorakit.families.common.unet_blocks import BLOCK_LAYOUT
from lorakit.families.sd.lora_keys import LORA_LAYOUT
from lorakit.objectives.ddpm import DDPMObjective
from lorakit.precision import load_dtype
from lorakit.transfer import to_device

_VERSIONS = {  # ss_base_model_version -> (ModelSpec architecture, resolution)
    "sd_v1": ("stable-diffusion-v1", 512),
    "sd_v1_v": ("stable-diffusion-v1", 512),
    "sd_v2": ("stable-diffusion-v2-512", 512),
    "sd_v2_v": ("stable-diffusion-v2-768-v", 768),
}


class StableDiffusionFamily(ModelFamily):
    """SD 1.x and 2.x (epsilon or v-prediction) with one CLIP text encoder."""

    name = "sd"
    title = "SD 1.x/2.x"
    trains_whole_model = True
    default_network_module = "networks.lora"
    bucket_step = 64
    takes_v2 = True
    block_layout = BLOCK_LAYOUT
    reads_caption_weights = True
    all_layers_args = {"conv_dim": "1", "conv_alpha": "1"}
    oft_attention = re.compile(r"_attn\d_(to_q|to_k|to_v|to_out_0)$")
    lora_hints = (LoraHint(50, ("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_", "lora_te_",
                                "unet.", "text_encoder.")),)
    version_prefixes = ("sd_v",)
    architecture_fragments = ("stable-diffusion-v",)
    inference = InferenceDefaults(steps=30, guidance_scale=7.5, resolution=512)
    # ComfyUI knows a diffusers-layout U-Net attention projection only by its old `processor.to_q` name
    comfy_drops = {r"^unet\..*\.attn\d\.to_(q|k|v|out\.0)$": "U-Net attention projections"}
    image_tasks = ("img2img", "inpaint")
    single_file_denoiser_prefixes = ("model.diffusion_model.",)

    textual_inversion_keys = ("emb_params",)

    def __init__(self) -> None:
        self.text_cache: CaptionCache | None = None
        self.prompts = ClipPrompts()  # --max_token_length / --weighted_captions of a training run

    @property
    def latent_format(self) -> LatentFileFormat:
        # sd-scripts stores the unscaled VAE sample
        return LatentFileFormat("_sd.npz", False, 0.18215)

    @property
    def text_cache_format(self) -> TextFileFormat:
        # sd-scripts caches no SD 1.x/2.x text outputs: lorakit's own file, named like the other families'
        return TextFileFormat("_sd_te.npz", ("hidden_state",),
                              settings=("clip_skip", "max_token_length", "weighted_captions"))

    @property
    def lora_layout(self):
        return LORA_LAYOUT

    def owns_checkpoint(self, path: str) -> bool:
        """An LDM single file (`model.diffusion_model.` with `cond_stage_model.`), or a diffusers folder with one
        text encoder. Pickled files cannot be read cheaply; as the family nobody else claims, SD takes them."""
        source = Path(path)
        if source.is_dir():
            return (source / "unet" / "config.json").is_file() and not (source / "text_encoder_2").exists()
        keys = safetensors_keys(source)
        if keys is None:
            return source.is_file()
        return any(k.startswith("model.diffusion_model.") for k in keys) and any(k.startswith("cond_stage_model.") for k in keys)

    def option_warnings(self, cfg: Any) -> list[str]:
        return prediction_type_warnings(cfg)

    def option_problems(self, cfg: Any, spec: TargetSpec | None = None) -> list[str]:
        return super().option_problems(cfg, spec) + whole_cache_problems(cfg)

    # -- loading -----------------------------------------------------------------------------------------

    def load(self, cfg: Any, spec: TargetSpec | None = None, text_cache: CaptionCache | None = None) -> Components:
        # sd-scripts has no text-encoder cache for SD 1.x/2.x (its option is SDXL's); here the same option
        # saves running the frozen encoder on the same captions every step
        self.text_cache = run_text_cache(cfg, text_cache)
        self.prompts = ClipPrompts.from_options(cfg)
        comps = self.load_model(ModelSource(
            cfg.pretrained_model_name_or_path, {"vae": cfg.vae} if cfg.vae else {}, load_dtype(cfg),
            v2=cfg.v2, v_parameterization=cfg.v_parameterization,
            text_encoders=self.text_cache is None or self.text_cache.needs_encoders,
        ))
        store_fp8(comps.denoiser, comps.text_encoders, fp8_parts(cfg))
        return comps

    def load_model(self, source: ModelSource) -> Components:
        from lorakit.families.sd.loading import load_sd_components

        return load_sd_components(source.path, v2=source.v2, v_parameterization=source.v_parameterization,
                                  vae_path=source.files.get("vae"), dtype=source.dtype or torch.float32,
                                  text_encoders=source.text_encoders)

    def objective(self, cfg: Any, comps: Components) -> DDPMObjective:
        return DDPMObjective.from_options(cfg, "v_prediction" if cfg.v_parameterization else "epsilon")

    # -- images and text ---------------------------------------------------------------------------------

    def encode_images(self, comps: Components, images: torch.Tensor) -> torch.Tensor:
        return encode_scaled(comps.vae, images)

    def decode_latents(self, comps: Components, latents: torch.Tensor) -> torch.Tensor:
        return decode_scaled(comps.vae, latents)

    def tokenize(self, comps: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Ids (B, windows, 77) and, with --weighted_captions, their weights."""
        return self.prompts.tokenize(comps.tokenizers[0], captions)

    def encode_text(self, comps: Components, captions: list[str], clip_skip: int | None = None) -> TextConditioning:
        """`encoder_hidden_states` (B, 77, width), or (B, 75·n + 2, width) with --max_token_length; with
        --cache_text_encoder_outputs each distinct caption is encoded once and reused (the encoder is frozen then)."""
        def encode(texts: list[str]) -> dict[str, torch.Tensor]:
            return self.text_encoder_outputs(comps, texts, clip_skip)

        outputs = encode(captions) if self.text_cache is None else self.text_cache.outputs(captions, encode)
        return TextConditioning({"encoder_hidden_states": outputs["hidden_state"]})

    def text_encoder_outputs(self, comps: Components, captions: list[str], clip_skip: int | None = None
                             ) -> dict[str, torch.Tensor]:
        return {"hidden_state": self._run_encoder(comps, captions, clip_skip)}

    def _run_encoder(self, comps: Components, captions: list[str], clip_skip: int | None) -> torch.Tensor:
        encoder = comps.text_encoders[0]
        ids, weights = self.tokenize(comps, captions)
        ids = to_device(encoder_ids(ids), encoder.device)
        if not clip_skip or clip_skip <= 1:
            states = encoder(ids).last_hidden_state
        else:
            # the n-th layer from the end, normalised like the last one (what A1111 "CLIP skip" means)
            states = _final_layer_norm(encoder)(encoder(ids, output_hidden_states=True).hidden_states[-clip_skip])
        return self.prompts.weigh(self.prompts.join(states, len(captions)), weights)

    def predict(self, comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning, batch: Any) -> torch.Tensor:
        from lorakit.families.sd.controlnet import controlnet_residuals

        context = text.tensors["encoder_hidden_states"].to(noisy.dtype)
        control = controlnet_residuals(comps, noisy, timesteps, context, batch)
        return comps.denoiser(noisy, timesteps, encoder_hidden_states=context, **control).sample

    def controlnet(self, cfg: Any) -> Any:
        from lorakit.families.sd.controlnet import UNetControlNet

        return UNetControlNet()

    # -- adapters ----------------------------------------------------------------------------------------

    def adapter_targets(self, comps: Components, spec: TargetSpec) -> list[AdapterTarget]:
        targets: list[AdapterTarget] = []
        if spec.train_unet:
            targets += unet_targets(comps.denoiser, spec.ranks)
        if spec.train_text_encoder:
            targets += clip_targets(comps.text_encoders[0], "lora_te", spec.ranks)
        return targets

    def text_encoders_to_train(self, comps: Components, spec: TargetSpec) -> list[torch.nn.Module]:
        return list(comps.text_encoders) if spec.train_text_encoder else []

    def enable_gradient_checkpointing(self, comps: Components, train_text_encoder: bool) -> None:
        gradient_checkpointing(comps.denoiser, comps.text_encoders[:1] if train_text_encoder else [])

    # -- sampling ----------------------------------------------------------------------------------------

    def pipeline(self, comps: Components, sampler: str | None = None) -> Any:
        """A diffusers pipeline over these very modules (LoRA applied to them shows in its output)."""
        from diffusers import StableDiffusionPipeline

        from lorakit.objectives.samplers import build_sampler

        return StableDiffusionPipeline(
            vae=comps.vae, text_encoder=comps.text_encoders[0], tokenizer=comps.tokenizers[0], unet=comps.denoiser,
            scheduler=build_sampler(sampler or "ddim", comps.extras.get("prediction_type", "epsilon")),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    def task_pipeline(self, comps: Components, task: str, sampler: str | None = None) -> Any:
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

        classes = {"img2img": StableDiffusionImg2ImgPipeline, "inpaint": StableDiffusionInpaintPipeline}
        return classes[task](**self.pipeline(comps, sampler).components)

    def load_embedding(self, comps: Components, state: dict[str, torch.Tensor], token: str, source: str) -> None:
        from lorakit.families.common.prompt_weighting import add_embedding

        # sd-scripts' (and A1111's safetensors) files hold `emb_params`, diffusers' one tensor under its token
        add_embedding(self.pipeline(comps), state, token, source, ("emb_params",), single_tensor=True)

    def prompt_embedding_kwargs(self, pipe: Any, prompts: list[str], negatives: list[str], *,
                                max_embeddings_multiples: int, clip_skip: int | None) -> dict[str, Any] | None:
        from lorakit.families.common.prompt_weighting import single_clip_embeddings

        return single_clip_embeddings(pipe, prompts, negatives, max_embeddings_multiples, clip_skip)

    def inference_resolution(self, source: ModelSource) -> int:
        # the SD 2.x v-prediction models were trained at 768 px
        return 768 if source.v_parameterization else self.inference.resolution

    # -- metadata ----------------------------------------------------------------------------------------

    def metadata(self, cfg: Any) -> dict[str, str]:
        return {"ss_base_model_version": _version(cfg.v2, cfg.v_parameterization), "ss_v2": str(bool(cfg.v2))}

    def base_model(self, version: str | None, *, variant: str | None = None, v_prediction: bool = False) -> BaseModelFacts:
        version = version if version in _VERSIONS else "sd_v1"
        architecture, resolution = _VERSIONS[version]
        prediction = "v" if v_prediction or version.endswith("_v") else "epsilon"
        return BaseModelFacts(version, architecture, "diffusers", resolution, prediction, v2=version.startswith("sd_v2"))

    def version_of(self, source: ModelSource, comps: Components) -> str:
        return _version(source.v2, source.v_parameterization)

    # -- whole-model files -------------------------------------------------------------------------------

    def save_single_file(self, comps: Components, path: Path, kind: str, dtype: torch.dtype | None = None) -> None:
        from lorakit.families.common.ldm_keys import save_sd_single_file

        save_sd_single_file(comps, path, fmt=kind, dtype=dtype)

    def save_folder(self, comps: Components, path: Path) -> None:
        from lorakit.families.sd.model_files import save_sd_diffusers_folder

        save_sd_diffusers_folder(comps, path)

    def checkpoint_pieces(self, comps: Components, parts: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
        from lorakit.families.common.ldm_keys import ldm_part_state

        for part in parts:
            yield ldm_part_state(comps, part)


def _version(v2: bool, v_parameterization: bool) -> str:
    return ("sd_v2" if v2 else "sd_v1") + ("_v" if v_parameterization else "")


def _final_layer_norm(encoder: torch.nn.Module) -> torch.nn.Module:
    owner = getattr(encoder, "text_model", encoder)
    return owner.final_layer_norm
