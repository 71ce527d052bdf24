"""FLUX.1 (dev, schnell): loading, conditioning, flow-matching prediction, LoRA targets and files.

Conditioning as in Black Forest Labs' reference and sd-scripts' flux_train_network.py: the autoencoder latent
normalised as (z − shift)·scale and packed into 2×2 patches (64 channels per token) with (0, row, col) position
ids; CLIP-L's pooled output as the global vector; T5-XXL's last hidden states as the text tokens (ids zero);
the guidance embedding fed `--guidance_scale` (dev only). LoRA targets follow sd-scripts' `networks.lora_flux`
with BFL names (`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`, `lora_te1_…`
for CLIP-L, `lora_te3_…` for T5 with `train_t5xxl=True`), the names ComfyUI, Forge and diffusers load.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters.algorithms import reads_family_args
from lorakit.adapters.spec import TargetSpec
from lorakit.adapters.targets import AdapterTarget, RankChoice
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
    SeparatePart,
    TextConditioning,
)
from lorakit.families.common.bfl_targets import reg_ranked
from lorakit.families.common.flow_metadata import flow_sampling_metadata
from lorakit.families.common.layers import fp8_parts, to_fp8
from lorakit.families.common.text_encoders import clip_targets, t5_targets
from lorakit.families.common.transformer_family import (
    BlockSwapFamily,
    ShiftScaleLatents,
    plan_double_single_swap,
    t5_family_problems,
    t5_family_warnings,
    trains_t5,
)
from lorakit.families.flux.controlnet import controlnet_inputs
from lorakit.families.flux.layers import checkpoint_offloading_to_cpu
from lorakit.families.flux.lora_keys import LORA_LAYOUT
from lorakit.families.flux.network_args import NETWORK_ARG_KEYS, FluxNetworkArgs
from lorakit.families.flux.packing import (
    PATCH,
    image_position_ids,
    pack_latents,
    unpack_latents,
)
from lorakit.families.flux.targets import (
    BFL_ATTENTION_CLASS,
    BFL_BLOCK_CLASSES,
    transformer_targets,
)
from lorakit.objectives.flow import (
    FlowObjective,
    apply_model_prediction_type,
    timesteps_to_sigmas,
)
from lorakit.precision import load_dtype
from lorakit.transfer import to_device

log = logging.getLogger("lorakit")

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = {"dev": 512, "schnell": 256}  # sd-scripts' defaults for --t5xxl_max_token_length
BASE_MODEL_VERSION = "flux1"
MODELSPEC_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"
_ATTENTION = re.compile(r"_attn_(qkv|proj)$")


class FluxFamily(ShiftScaleLatents, BlockSwapFamily, ModelFamily):
    """FLUX.1-dev and -schnell with CLIP-L and T5-XXL."""

    name = "flux"
    title = "FLUX.1"
    large_text_encoders = (1,)  # what --base_quant quantizes besides the denoiser
    trains_whole_model = True
    default_network_module = "networks.lora_flux"
    lora_network_modules = ("networks.lora_flux",)
    oft_network_modules = ("networks.oft_flux",)
    bucket_step = 64
    all_layers_args = {"in_dims": "[1,1,1,1,1]", "train_t5xxl": "True"}
    oft_attention = _ATTENTION
    lora_hints = (LoraHint(20, ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "transformer.single_transformer_blocks.",
                                "lora_te3_")),)
    version_prefixes = ("flux",)  # Chroma's files (`chroma`) are the Chroma family's
    architecture_fragments = ("flux",)
    inference = InferenceDefaults(steps=30, guidance_scale=3.5, resolution=1024)
    part_files = ("clip_l", "t5xxl", "ae")
    separate_parts = {"clip_l": SeparatePart(0, "lora_te1", "CLIP-L"), "t5xxl": SeparatePart(1, "lora_te3", "T5-XXL")}
    single_file_kinds = ("safetensors", "diffusers")  # "diffusers": the transformer alone under diffusers' names
    single_file_denoiser_only = True  # flux1-dev.safetensors: the transformer; CLIP-L, T5 and the AE have their own
    single_file_denoiser_prefixes = ("",)
    # convert_diffusers_to_flux.py's precisions (library.utils.str_to_dtype)
    save_precisions = ("float", "fp32", "float32", "fp16", "float16", "bf16", "bfloat16", "fp8", "fp8_e4m3fn", "fp8_e5m2")
    uses_own_scheduler = True
    # T5 modules: ComfyUI maps them under its own name (what lorakit writes), not diffusers-style ones; diffusers
    # ignores T5 LoRA modules whatever their names
    comfy_drops = {r"^text_encoder_2\.encoder\.": "T5 modules under diffusers-style names"}
    diffusers_skips = {r"^(text_encoders\.t5xxl\.|text_encoder_2\.encoder\.)": "T5 modules"}
    webui_kohya = "Forge only (A1111 has no FLUX)"
    webui_diffusers = "Forge only (A1111 has no FLUX)"
    diffusers_ignores = {"lora_te3_": "T5 (lora_te3)"}

    def __init__(self) -> None:
        self.text_cache: CaptionCache | None = None
        self.cache_clip = False  # CLIP-L's pooled output is cached too (no CLIP-L LoRA is trained)

    @property
    def latent_format(self) -> LatentFileFormat:
        # FLUX's autoencoder already returns scaled latents, which sd-scripts stores as they are
        return LatentFileFormat("_flux.npz", True)

    @property
    def text_cache_format(self) -> TextFileFormat:
        return TextFileFormat("_flux_te.npz", ("l_pooled", "t5_out", "txt_ids", "t5_attn_mask"),
                              switches=("apply_t5_attn_mask",), settings=("t5xxl_max_token_length",),
                              encoder_files=("clip_l", "t5xxl"))

    @property
    def lora_layout(self):
        return LORA_LAYOUT

    def owns_checkpoint(self, path: str) -> bool:
        from lorakit.families.flux.loading import is_flux_source

        return is_flux_source(path)

    def option_problems(self, cfg: Any, spec: TargetSpec | None = None) -> list[str]:
        problems = super().option_problems(cfg, spec)
        if cfg.model_type == "chroma":
            problems.append("--model_type chroma: this is a FLUX.1 model; Chroma trains with --family chroma (detected from "
                            "a Chroma checkpoint with --family auto)")
        return problems + t5_family_problems(self.name, cfg, spec)

    def option_warnings(self, cfg: Any) -> list[str]:
        warnings = t5_family_warnings(self.name, cfg)
        swap = _deprecated_blocks_to_swap(cfg)
        if swap:
            # flux_train.py maps them so, when --blocks_to_swap is not given
            cfg.blocks_to_swap = swap
            warnings.append(f"--double_blocks_to_swap/--single_blocks_to_swap are deprecated; taken as --blocks_to_swap "
                            f"{swap} (double + single // 2)")
        return warnings

    def parse_network_args(self, args: Mapping[str, str], spec: TargetSpec) -> tuple[Any, list[str]]:
        return FluxNetworkArgs.parse(args, spec.rank)

    def family_arg_keys(self, module: str) -> frozenset[str] | None:
        return NETWORK_ARG_KEYS if reads_family_args(self.network_module(module), self) else None

    def load(self, cfg: Any, spec: TargetSpec | None = None, text_cache: CaptionCache | None = None) -> Components:
        self.text_cache = run_text_cache(cfg, text_cache)
        comps = self.load_model(ModelSource(
            cfg.pretrained_model_name_or_path, {k: getattr(cfg, k) for k in self.part_files if getattr(cfg, k)},
            load_dtype(cfg), fp8=fp8_parts(cfg), tokenizer_cache_dir=cfg.tokenizer_cache_dir,
            text_encoders=self.text_cache is None or self.text_cache.needs_encoders,
        ))
        comps.extras.update(self._conditioning_options(cfg, comps))
        comps.extras["train_t5xxl"] = trains_t5(spec)
        # T5's outputs always, CLIP-L's too unless CLIP-L trains (sd-scripts' "partial" caching: a trained
        # encoder runs every step)
        self.cache_clip = not (spec is not None and spec.train_text_encoder)
        self._check_block_swap(cfg, comps)
        return comps

    def load_model(self, source: ModelSource) -> Components:
        from lorakit.families.flux.loading import load_flux_components
        from lorakit.families.flux.model_files import load_flux_parts

        files, dtype = source.files, source.dtype or torch.float32
        if source.denoiser_only:
            from lorakit.families.flux.model_files import load_transformer_alone

            return load_transformer_alone(source.path, dtype)
        if source.partial and not Path(source.path).is_dir():
            comps = load_flux_parts(source.path, clip_l=files.get("clip_l"), t5xxl=files.get("t5xxl"), dtype=dtype)
        else:
            comps = load_flux_components(source.path, clip_l=files.get("clip_l"), t5xxl=files.get("t5xxl"), ae=files.get("ae"),
                                         dtype=dtype, text_encoders=source.text_encoders,
                                         tokenizer_cache_dir=source.tokenizer_cache_dir)
        if source.fp8:
            layers = to_fp8(comps.denoiser)
            if source.fp8 == "all":
                layers += sum(to_fp8(encoder) for encoder in comps.text_encoders)
            log.info("--fp8_base: %d linear layers store float8_e4m3fn weights", layers)
        return comps

    @staticmethod
    def _conditioning_options(cfg: Any, comps: Components) -> dict[str, Any]:
        variant = "schnell" if comps.extras.get("schnell") else "dev"
        # the tokenizer's own limit wins over the default (lorakit's tiny test tokenizer stops at 32); without
        # tokenizers the captions' outputs are all cached and no length is needed
        default_length = T5_MAX_LENGTH[variant]
        if comps.tokenizers:
            default_length = min(default_length, comps.tokenizers[1].model_max_length)
        return {
            "variant": variant,
            "guidance_scale": float(cfg.guidance_scale),
            "t5_max_length": cfg.t5xxl_max_token_length or default_length,
            "apply_t5_attn_mask": bool(cfg.apply_t5_attn_mask),
            "model_prediction_type": cfg.model_prediction_type,
            "cpu_offload_checkpointing": bool(cfg.cpu_offload_checkpointing),
        }

    @staticmethod
    def _check_block_swap(cfg: Any, comps: Components) -> None:
        """sd-scripts' limits on --blocks_to_swap, then the plan: N//2 double and 2·(N − N//2) single blocks
        on the CPU (`common/block_swap.py`; installed on the device by the first `predict`)."""
        swap = cfg.blocks_to_swap or (18 if getattr(cfg, "split_mode", False) else 0)
        if not swap:
            return
        plan_double_single_swap(comps, swap, "FLUX.1 allows 35")

    def objective(self, cfg: Any, comps: Components) -> FlowObjective:
        return FlowObjective.from_options(cfg, patch_size=PATCH)

    def encode_text(self, comps: Components, captions: list[str], clip_skip: int | None = None) -> TextConditioning:
        """CLIP-L pooled output and T5 hidden states (`clip_skip` does not apply to FLUX, as in sd-scripts)."""
        if self.text_cache is None:
            outputs = self.text_encoder_outputs(comps, captions)
        elif self.cache_clip:
            outputs = self.text_cache.outputs(captions, lambda texts: self.text_encoder_outputs(comps, texts))
        else:  # the trained CLIP-L runs every step, with gradients; only T5 is encoded for the cache
            outputs = self.text_cache.outputs(captions, lambda texts: self._t5_outputs(comps, texts))
            fresh = self._clip_outputs(comps, captions)
            device = fresh["l_pooled"].device
            outputs = {**{k: v.to(device) for k, v in outputs.items()}, **fresh}
        return TextConditioning({"pooled": outputs["l_pooled"], "t5": outputs["t5_out"], "t5_mask": outputs["t5_attn_mask"]})

    def text_encoder_outputs(self, comps: Components, captions: list[str], clip_skip: int | None = None
                             ) -> dict[str, torch.Tensor]:
        """sd-scripts' `l_pooled` (CLIP-L's pooled output), `t5_out` (T5's last hidden states), `txt_ids` (zeros:
        the text tokens' positions) and `t5_attn_mask`."""
        return {**self._clip_outputs(comps, captions), **self._t5_outputs(comps, captions)}

    @staticmethod
    def _clip_outputs(comps: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        clip, clip_tok = comps.text_encoders[0], comps.tokenizers[0]
        clip_ids = clip_tok(captions, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
        return {"l_pooled": clip(to_device(clip_ids, clip.device)).pooler_output}

    @staticmethod
    def _t5_outputs(comps: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        t5, t5_tok = comps.text_encoders[1], comps.tokenizers[1]
        tokens = t5_tok(
            captions, padding="max_length", max_length=comps.extras["t5_max_length"], truncation=True, return_tensors="pt"
        )
        mask = to_device(tokens.attention_mask, t5.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and comps.extras.get("train_t5xxl", False)):
            hidden = t5(to_device(tokens.input_ids, t5.device), attention_mask=mask if comps.extras["apply_t5_attn_mask"] else None).last_hidden_state
        return {"t5_out": hidden, "t5_attn_mask": mask, "txt_ids": hidden.new_zeros(*hidden.shape[:2], 3)}

    def predict(self, comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning, batch: Any) -> torch.Tensor:
        """The transformer's velocity for the noisy latents, turned per --model_prediction_type."""
        self.prepare_block_swap(comps, None, noisy.device)  # once, with --blocks_to_swap
        transformer = comps.denoiser
        _, _, height, width = noisy.shape
        dtype = noisy.dtype
        t5 = text.tensors["t5"].to(dtype)
        sigmas = timesteps_to_sigmas(timesteps)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((noisy.shape[0],), comps.extras["guidance_scale"], device=noisy.device, dtype=dtype)
        inputs = dict(
            hidden_states=pack_latents(noisy),
            encoder_hidden_states=t5,
            pooled_projections=text.tensors["pooled"].to(dtype),
            timestep=sigmas.to(dtype),  # diffusers' Flux multiplies by 1000 inside, as BFL's timestep embedding
            img_ids=image_position_ids(height, width, noisy.device, dtype),
            txt_ids=torch.zeros(t5.shape[1], 3, device=noisy.device, dtype=dtype),
            guidance=guidance,
            joint_attention_kwargs=self._attention_kwargs(comps, text, height, width),
        )
        control = controlnet_inputs(comps, batch, **inputs)  # an attached ControlNet's residuals
        output = transformer(**inputs, **control, return_dict=False)[0]
        velocity = unpack_latents(output, height, width)
        return apply_model_prediction_type(velocity, noisy, sigmas, comps.extras["model_prediction_type"])

    @staticmethod
    def _attention_kwargs(comps: Components, text: TextConditioning, height: int, width: int) -> dict | None:
        """With --apply_t5_attn_mask, T5 padding is hidden from every joint attention (text tokens come first)."""
        if not comps.extras["apply_t5_attn_mask"]:
            return None
        text_mask = text.tensors["t5_mask"].bool()
        image_tokens = (height // PATCH) * (width // PATCH)
        image_mask = torch.ones(text_mask.shape[0], image_tokens, dtype=torch.bool, device=text_mask.device)
        return {"attention_mask": torch.cat([text_mask, image_mask], dim=1)[:, None, None, :]}

    # ----------------------------------------------------------------------------------------- adapters

    def adapter_targets(self, comps: Components, spec: TargetSpec) -> list[AdapterTarget]:
        args: FluxNetworkArgs = spec.family_args
        alpha = spec.alpha_option or None
        targets: list[AdapterTarget] = []
        if spec.train_unet:
            targets += transformer_targets(comps.denoiser, args, alpha)
        if spec.train_text_encoder:
            clip, t5 = comps.text_encoders
            ranks = RankChoice(args.network_dim, alpha or float(args.network_dim))
            encoders = clip_targets(clip, "lora_te1", ranks) + (t5_targets(t5, "lora_te3", ranks) if args.train_t5xxl else [])
            targets += reg_ranked(encoders, args, alpha)
        return targets

    def lycoris_denoiser_targets(self, comps: Components, spec: TargetSpec, preset_classes: set[str]) -> list[AdapterTarget]:
        """The layers LyCORIS' walk over BFL's model would pick for the preset, among the family's own targets
        (BFL names over fused q/k/v views): classes DoubleStreamBlock/SingleStreamBlock (full, full-lin, attn-mlp,
        unet-only, unet-transformer-only) take every block linear, SelfAttention (attn-only) the double blocks'
        qkv and proj, any other preset none."""
        targets = [t for t in self.adapter_targets(comps, spec) if t.component == "unet"]
        if preset_classes & BFL_BLOCK_CLASSES:
            return targets
        if BFL_ATTENTION_CLASS in preset_classes:
            return [t for t in targets if _ATTENTION.search(t.name)]
        return []

    def text_encoders_to_train(self, comps: Components, spec: TargetSpec) -> list[torch.nn.Module]:
        if not spec.train_text_encoder:
            return []
        clip, t5 = comps.text_encoders
        return [clip, t5] if spec.family_args.train_t5xxl else [clip]

    def text_encoder_lr_groups(self, cfg: Any) -> dict[str, float | None]:
        """Up to two --text_encoder_lr values, for lora_te1 (CLIP-L) and lora_te3 (T5-XXL), as sd-scripts'
        `lora_flux.prepare_optimizer_params_with_multiple_te_lrs`: one value applies to both encoders."""
        prefixes = ("lora_te1", "lora_te3")  # CLIP-L, T5-XXL
        values = list(cfg.text_encoder_lr or [])
        if len(values) > 2:
            raise ConfigError([f"--text_encoder_lr: FLUX takes at most 2 values (CLIP-L, T5), got {len(values)}"])
        if not values:
            return dict.fromkeys(prefixes)
        return dict(zip(prefixes, values + values[:1] * (2 - len(values))))

    def enable_gradient_checkpointing(self, comps: Components, train_text_encoder: bool) -> None:
        if comps.extras.get("cpu_offload_checkpointing"):
            comps.denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_offloading_to_cpu)
        else:
            comps.denoiser.enable_gradient_checkpointing()
        if train_text_encoder:
            for encoder in comps.text_encoders[: 2 if comps.extras.get("train_t5xxl") else 1]:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    text_mask_options = ("apply_t5_attn_mask",)

    def masked_prompt_inputs(self, comps: Components, prompt: str, negative: str, masks: frozenset[str]) -> dict[str, Any]:
        from lorakit.families.flux.masked_text import masked_prompt_inputs

        return masked_prompt_inputs(comps, prompt, negative)

    def pipeline(self, comps: Components, sampler: str | None = None) -> Any:
        """A diffusers FluxPipeline over these very modules (an attached LoRA shows in its images). FLUX samples
        with the flow Euler scheduler whatever `sampler` says, as sd-scripts does."""
        from diffusers import FluxPipeline

        from lorakit.families.flux.loading import flow_scheduler

        clip, t5 = comps.text_encoders
        return FluxPipeline(
            scheduler=flow_scheduler(), vae=comps.vae, text_encoder=clip, tokenizer=comps.tokenizers[0],
            text_encoder_2=t5, tokenizer_2=comps.tokenizers[1], transformer=comps.denoiser,
        )

    def controlnet(self, cfg: Any) -> Any:
        from lorakit.families.flux.controlnet import FluxControlNet

        return FluxControlNet(self.pipeline)

    def lora_to_diffusers(self, state, metadata, *, keep_alpha: bool = False):
        from lorakit.families.flux.lora_convert import kohya_to_diffusers

        return kohya_to_diffusers(state, metadata, keep_alpha=keep_alpha)

    def lora_from_diffusers(self, state, metadata):
        from lorakit.families.flux.lora_convert import diffusers_to_kohya

        return diffusers_to_kohya(state, metadata)

    # ----------------------------------------------------------------------------------------- metadata

    def metadata(self, cfg: Any) -> dict[str, str]:
        """sd-scripts' FLUX `ss_*` keys."""
        return {
            "ss_base_model_version": BASE_MODEL_VERSION,
            "ss_v2": "False",
            "ss_model_type": str(cfg.model_type),
            "ss_apply_t5_attn_mask": str(bool(cfg.apply_t5_attn_mask)),
            **flow_sampling_metadata(cfg),
            "ss_guidance_scale": str(cfg.guidance_scale),
            "ss_model_prediction_type": str(cfg.model_prediction_type),
        }

    def base_model(self, version: str | None, *, variant: str | None = None, v_prediction: bool = False) -> BaseModelFacts:
        """FLUX.1-dev unless the model is schnell (no guidance embedding); no prediction type (sd-scripts omits it)."""
        return BaseModelFacts(BASE_MODEL_VERSION, f"flux-1-{variant or 'dev'}", MODELSPEC_IMPLEMENTATION, 1024, None)

    def model_variant(self, comps: Components) -> str | None:
        return "schnell" if comps.extras.get("schnell") else "dev"

    def variant_of_architecture(self, architecture: str) -> str | None:
        """`schnell` for a file whose ModelSpec says FLUX.1-schnell (files of both share the version `flux1`)."""
        return "schnell" if architecture.startswith("flux-1-schnell") else None

    # ----------------------------------------------------------------------------------------- whole-model files

    def save_single_file(self, comps: Components, path: Path, kind: str, dtype: torch.dtype | None = None) -> None:
        """The transformer alone, in BFL layout (`kind` "diffusers": under diffusers' names, as sd-scripts'
        flux_merge_lora.py --diffusers); its text encoders go to their own files (`save_part_file`)."""
        from lorakit.families.flux.model_files import save_transformer_file

        save_transformer_file(comps.denoiser, path, dtype, layout="diffusers" if kind == "diffusers" else "bfl")

    def save_folder(self, comps: Components, path: Path) -> None:
        """The whole FluxPipeline folder; a model read from the transformer's file alone is written as diffusers'
        transformer folder (config.json and its weights), which `FluxTransformer2DModel.from_pretrained` and
        lorakit (as the model, with --clip_l, --t5xxl, --ae) read."""
        from lorakit.checkpoint_io import save_pipeline_atomic

        if any(part is None for part in (comps.vae, *comps.text_encoders)) or not comps.tokenizers:
            from lorakit.checkpoint_io import save_model_folder_atomic

            save_model_folder_atomic(comps.denoiser, path)
            return
        save_pipeline_atomic(self.pipeline(comps), path)

    def save_part_file(self, comps: Components, part: str, path: Path, dtype: torch.dtype | None) -> None:
        from lorakit.families.flux.model_files import save_clip_l_file, save_t5_file

        writer = save_clip_l_file if part == "clip_l" else save_t5_file
        writer(comps.text_encoders[self.separate_parts[part].encoder_index], path, dtype)

    def checkpoint_parts(self, comps: Components) -> tuple[str, ...]:
        return ("denoiser",)  # a BFL file holds the transformer; the AE and the encoders have files of their own

    def checkpoint_pieces(self, comps: Components, parts: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
        """The transformer in BFL names, one block at a time (fusing q/k/v builds new tensors)."""
        from lorakit.families.flux.model_files import bfl_pieces

        if "denoiser" in parts:
            yield from bfl_pieces(comps.denoiser.state_dict())


def _deprecated_blocks_to_swap(cfg: Any) -> int:
    double, single = getattr(cfg, "double_blocks_to_swap", None), getattr(cfg, "single_blocks_to_swap", None)
    if cfg.blocks_to_swap is not None or (double is None and single is None):
        return 0
    return (double or 0) + (single or 0) // 2
