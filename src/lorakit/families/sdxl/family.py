"""SDXL: loading, two-encoder text conditioning, size conditioning, prediction, LoRA targets and files.

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
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters.spec import TargetSpec
from lorakit.adapters.targets import AdapterTarget, RankChoice, kohya_name
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
from lorakit.families.common.prediction import prediction_type_warnings
from lorakit.families.common.text_cache import whole_cache_problems
from lorakit.families.common.text_encoders import clip_targets
from lorakit.families.common.layers import fp8_parts
from lorakit.families.common.unet import decode_scaled, encode_scaled, gradient_checkpointing, store_fp8
from lorakit.families.common.unet import unet_targets as diffusers_unet_targets
from lorakit.families.sdxl.blocks import BLOCK_LAYOUT
from lorakit.families.sdxl.controlnet import attach_condition
from lorakit.families.sdxl.lora_keys import LORA_LAYOUT
from lorakit.objectives.ddpm import DDPMObjective
from lorakit.precision import load_dtype
from lorakit.transfer import to_device

log = logging.getLogger("lorakit")

BASE_MODEL_VERSION = "sdxl_base_v1-0"
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base"
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
TEXT_ENCODER_PREFIXES = ("lora_te1", "lora_te2")


class StableDiffusionXLFamily(ModelFamily):
    """SDXL base 1.0 (and fine-tunes of it) with CLIP-L + OpenCLIP-bigG text encoders."""

    name = "sdxl"
    title = "SDXL"
    trains_whole_model = True
    default_network_module = "networks.lora"
    bucket_step = 32
    block_lr_count = 23  # sdxl_train.py's --block_lr
    block_layout = BLOCK_LAYOUT
    reads_caption_weights = True
    all_layers_args = {"conv_dim": "1", "conv_alpha": "1"}
    oft_attention = re.compile(r"_attn\d_(to_q|to_k|to_v|to_out_0)$")
    lora_hints = (LoraHint(40, ("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_output_blocks_",
                                "text_encoder_2.")),)
    version_prefixes = ("sdxl",)
    architecture_fragments = ("stable-diffusion-xl",)
    inference = InferenceDefaults(steps=30, guidance_scale=7.5, resolution=1024)
    # ComfyUI knows a diffusers-layout U-Net attention projection only by its old `processor.to_q` name
    comfy_drops = {r"^unet\..*\.attn\d\.to_(q|k|v|out\.0)$": "U-Net attention projections"}
    image_tasks = ("img2img", "inpaint")
    single_file_denoiser_prefixes = ("model.diffusion_model.",)

    textual_inversion_keys = ("clip_l", "clip_g")

    def __init__(self) -> None:
        self.vae_in_float32 = False
        self.text_cache: CaptionCache | None = None
        self.prompts = ClipPrompts()  # --max_token_length / --weighted_captions of a training run

    @property
    def latent_format(self) -> LatentFileFormat:
        return LatentFileFormat("_sdxl.npz", False, 0.13025)

    @property
    def text_cache_format(self) -> TextFileFormat:
        return TextFileFormat("_te_outputs.npz", ("hidden_state1", "hidden_state2", "pool2"),
                              settings=("max_token_length", "weighted_captions"))

    @property
    def lora_layout(self):
        return LORA_LAYOUT

    def owns_checkpoint(self, path: str) -> bool:
        from lorakit.families.sdxl.detect import is_sdxl_checkpoint

        return is_sdxl_checkpoint(path)

    def option_problems(self, cfg: Any, spec: TargetSpec | None = None) -> list[str]:
        return super().option_problems(cfg, spec) + whole_cache_problems(cfg)

    def option_warnings(self, cfg: Any) -> list[str]:
        warnings = []
        if cfg.clip_skip:
            warnings.append("--clip_skip is ignored for SDXL: it always uses the penultimate layer of both encoders")
        if cfg.mixed_precision == "fp16" and not cfg.no_half_vae:
            warnings.append("the SDXL VAE overflows in fp16 (NaN latents are zeroed); add --no_half_vae to keep it in float32")
        return warnings + prediction_type_warnings(cfg)

    # -- loading -----------------------------------------------------------------------------------------

    def load(self, cfg: Any, spec: TargetSpec | None = None, text_cache: CaptionCache | None = None) -> Components:
        self._read_options(cfg, text_cache)
        comps = self.load_model(ModelSource(cfg.pretrained_model_name_or_path, {"vae": cfg.vae} if cfg.vae else {},
                                            load_dtype(cfg), v_parameterization=cfg.v_parameterization,
                                            text_encoders=self.text_cache is None or self.text_cache.needs_encoders))
        store_fp8(comps.denoiser, comps.text_encoders, fp8_parts(cfg))
        return comps

    def _read_options(self, cfg: Any, text_cache: CaptionCache | None = None) -> None:
        """Remember the SDXL-specific switches that change how images and text are encoded."""
        self.vae_in_float32 = bool(cfg.no_half_vae)
        self.text_cache = run_text_cache(cfg, text_cache)
        self.prompts = ClipPrompts.from_options(cfg)

    def load_model(self, source: ModelSource) -> Components:
        from lorakit.families.sdxl.loading import load_sdxl_components

        return load_sdxl_components(source.path, v_parameterization=source.v_parameterization,
                                    vae_path=source.files.get("vae"), dtype=source.dtype or torch.float32,
                                    text_encoders=source.text_encoders)

    def objective(self, cfg: Any, comps: Components) -> DDPMObjective:
        return DDPMObjective.from_options(cfg, "v_prediction" if cfg.v_parameterization else "epsilon")

    # -- images ------------------------------------------------------------------------------------------

    def encode_images(self, comps: Components, images: torch.Tensor) -> torch.Tensor:
        return encode_scaled(self._vae(comps), images)

    def decode_latents(self, comps: Components, latents: torch.Tensor) -> torch.Tensor:
        return decode_scaled(self._vae(comps), latents)

    def _vae(self, comps: Components) -> torch.nn.Module:
        """The VAE, in float32 under --no_half_vae: the training setup already keeps it there; this covers callers
        that cast the whole model to one dtype themselves."""
        vae = comps.vae
        if self.vae_in_float32 and vae.dtype != torch.float32:
            vae.to(dtype=torch.float32)
        return vae

    # -- text --------------------------------------------------------------------------------------------

    def tokenize(self, comps: Components, captions: list[str]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Ids (B, windows, 77) and weights for CLIP-L (padded with the end token) and bigG (padded with "!", id 0)."""
        return [self.prompts.tokenize(tokenizer, captions) for tokenizer in comps.tokenizers]

    def encode_text(self, comps: Components, captions: list[str], clip_skip: int | None = None) -> TextConditioning:
        """`encoder_hidden_states` (B, 77, w1 + w2) and `text_embeds` (B, projection) for the captions.

        `clip_skip` is ignored: SDXL was trained on the penultimate layers. With --cache_text_encoder_outputs
        each distinct caption is encoded once and reused (the encoders are frozen then).
        """
        def encode(texts: list[str]) -> dict[str, torch.Tensor]:
            return self.text_encoder_outputs(comps, texts)

        outputs = encode(captions) if self.text_cache is None else self.text_cache.outputs(captions, encode)
        hidden1 = outputs["hidden_state1"]
        hidden = torch.cat([hidden1, outputs["hidden_state2"].to(hidden1.dtype)], dim=-1)
        return TextConditioning({"encoder_hidden_states": hidden, "text_embeds": outputs["pool2"]})

    def text_encoder_outputs(self, comps: Components, captions: list[str], clip_skip: int | None = None
                             ) -> dict[str, torch.Tensor]:
        """sd-scripts' `hidden_state1` (CLIP-L's penultimate layer), `hidden_state2` (bigG's) and `pool2` (bigG's
        projected pooled output)."""
        te1, te2 = comps.text_encoders
        (ids1, weights1), (ids2, weights2) = self.tokenize(comps, captions)
        prompts, batch = self.prompts, len(captions)
        hidden1 = te1(to_device(encoder_ids(ids1), te1.device), output_hidden_states=True).hidden_states[-2]
        out2 = te2(to_device(encoder_ids(ids2), te2.device), output_hidden_states=True)
        return {"hidden_state1": prompts.weigh(prompts.join(hidden1, batch), weights1),
                "hidden_state2": prompts.weigh(prompts.join(out2.hidden_states[-2], batch), weights2),
                # with --max_token_length the pooled embedding is the first window's, as in sd-scripts
                "pool2": out2.text_embeds[:: prompts.windows]}

    # -- prediction --------------------------------------------------------------------------------------

    def predict(self, comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning, batch: Any) -> torch.Tensor:
        unet = comps.denoiser
        added = {
            "text_embeds": text.tensors["text_embeds"].to(device=noisy.device, dtype=noisy.dtype),
            "time_ids": to_device(size_time_ids(batch, noisy, vae_scale_factor(comps)), noisy.device, noisy.dtype),
        }
        context = text.tensors["encoder_hidden_states"].to(noisy.dtype)
        attach_condition(comps, batch)  # an attached ControlNet-LLLite reads the batch's conditioning images
        return unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample

    def controlnet(self, cfg: Any) -> Any:
        """SDXL's ControlNet is the ControlNet-LLLite (with or without --lllite), as sd-scripts trains it."""
        from lorakit.families.sdxl.controlnet import SdxlLLLite

        return SdxlLLLite(self.pipeline)

    # -- adapters ----------------------------------------------------------------------------------------

    def kohya_module_path(self, comps: Components):
        """How U-Net module paths are renamed in file names (SGM layout), for adapters that walk the model."""
        return sgm_module_path(comps)

    def adapter_targets(self, comps: Components, spec: TargetSpec) -> list[AdapterTarget]:
        targets: list[AdapterTarget] = []
        if spec.train_unet:
            targets += unet_targets(comps.denoiser, spec.ranks)
        if spec.train_text_encoder:
            for prefix, encoder in zip(TEXT_ENCODER_PREFIXES, comps.text_encoders):
                targets += clip_targets(encoder, prefix, spec.ranks)
        return targets

    def text_encoders_to_train(self, comps: Components, spec: TargetSpec) -> list[torch.nn.Module]:
        return list(comps.text_encoders) if spec.train_text_encoder else []

    def enable_gradient_checkpointing(self, comps: Components, train_text_encoder: bool) -> None:
        gradient_checkpointing(comps.denoiser, list(comps.text_encoders) if train_text_encoder else [])

    # -- sampling ----------------------------------------------------------------------------------------

    def pipeline(self, comps: Components, sampler: str | None = None) -> Any:
        """A diffusers SDXL pipeline over these very modules (LoRA applied to them shows in its output)."""
        from diffusers import StableDiffusionXLPipeline

        from lorakit.objectives.samplers import build_sampler

        te1, te2 = comps.text_encoders
        tok1, tok2 = comps.tokenizers
        return StableDiffusionXLPipeline(
            vae=self._vae(comps), text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
            unet=comps.denoiser, scheduler=build_sampler(sampler or "ddim", comps.extras.get("prediction_type", "epsilon")),
        )

    def task_pipeline(self, comps: Components, task: str, sampler: str | None = None) -> Any:
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

        classes = {"img2img": StableDiffusionXLImg2ImgPipeline, "inpaint": StableDiffusionXLInpaintPipeline}
        return classes[task](**self.pipeline(comps, sampler).components)

    def load_embedding(self, comps: Components, state: dict[str, torch.Tensor], token: str, source: str) -> None:
        from lorakit.families.common.prompt_weighting import add_embedding

        # sd-scripts' and A1111's SDXL files hold one tensor per encoder: `clip_l` and `clip_g`
        pipe = self.pipeline(comps)
        add_embedding(pipe, state, token, source, ("clip_l",), pipe.text_encoder, pipe.tokenizer)
        add_embedding(pipe, state, token, source, ("clip_g",), pipe.text_encoder_2, pipe.tokenizer_2)

    def prompt_embedding_kwargs(self, pipe: Any, prompts: list[str], negatives: list[str], *,
                                max_embeddings_multiples: int, clip_skip: int | None) -> dict[str, Any] | None:
        from lorakit.families.common.prompt_weighting import dual_clip_embeddings

        return dual_clip_embeddings(pipe, prompts, negatives, max_embeddings_multiples)

    # -- metadata ----------------------------------------------------------------------------------------

    def metadata(self, cfg: Any) -> dict[str, str]:
        return {"ss_base_model_version": BASE_MODEL_VERSION, "ss_v2": "False"}

    def base_model(self, version: str | None, *, variant: str | None = None, v_prediction: bool = False) -> BaseModelFacts:
        return BaseModelFacts(BASE_MODEL_VERSION, MODELSPEC_ARCHITECTURE, MODELSPEC_IMPLEMENTATION, 1024,
                              "v" if v_prediction else "epsilon")

    # -- whole-model files -------------------------------------------------------------------------------

    def save_single_file(self, comps: Components, path: Path, kind: str, dtype: torch.dtype | None = None) -> None:
        from lorakit.families.sdxl.sgm_keys import save_sdxl_single_file

        save_sdxl_single_file(comps, path, fmt=kind, dtype=dtype)

    def save_folder(self, comps: Components, path: Path) -> None:
        from lorakit.families.sdxl.model_files import save_sdxl_diffusers_folder

        save_sdxl_diffusers_folder(comps, path)

    def checkpoint_pieces(self, comps: Components, parts: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
        from lorakit.families.sdxl.sgm_keys import sgm_part_state

        for part in parts:
            yield sgm_part_state(comps, part)

    def lr_blocks(self, comps: Components) -> Callable[[str], int]:
        """sdxl_train.py's 23 `--block_lr` blocks, read off the SGM name of each U-Net parameter."""
        from lorakit.families.sdxl.blocks import block_lr_index
        from lorakit.families.sdxl.sgm_keys import SgmUnetNames

        names = SgmUnetNames(dict(comps.denoiser.config))
        return lambda name: block_lr_index(names.key(name))


def sgm_module_path(comps: Components):
    """diffusers U-Net module path -> SGM path, the layout SDXL kohya/LyCORIS file names use."""
    from lorakit.families.sdxl.sgm_keys import SgmUnetNames

    return SgmUnetNames(dict(comps.denoiser.config)).module


def unet_targets(unet: torch.nn.Module, ranks: RankChoice) -> list[AdapterTarget]:
    """The U-Net's LoRA targets (as the SD family chooses them), renamed to their SGM module paths."""
    from lorakit.families.sdxl.sgm_keys import SgmUnetNames

    names = SgmUnetNames(dict(unet.config))
    layers = ((path, m) for path, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    sgm_name = {kohya_name("lora_unet", path): kohya_name("lora_unet", names.module(path)) for path, _ in layers}
    return [AdapterTarget(sgm_name[t.name], t.module, t.component, t.rank, t.alpha) for t in diffusers_unet_targets(unet, ranks)]


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
