"""SD3 / SD3.5 (Medium, Large): loading, three-encoder conditioning, flow-matching prediction, LoRA targets, files.

As sd-scripts' `sd3_train_network.py` (Esser et al. 2024, "Scaling Rectified Flow Transformers",
arXiv:2403.03206):
- latents are the 16-channel VAE's, normalised as (z − shift)·scale (SD3's VAE: 0.0609, 1.5305);
- the text conditioning is CLIP-L's, CLIP-G's and T5-XXL's outputs (`conditioning.py`); `--apply_lg_attn_mask` /
  `--apply_t5_attn_mask` hide padding inside the encoders and zero the padded outputs;
- the MMDiT's velocity is preconditioned to an x₀ estimate, as `objective.py` explains;
- LoRA targets follow `networks.lora_sd3` with SAI names (`lora_unet_joint_blocks_0_x_block_attn_qkv`,
  `lora_te1_` CLIP-L, `lora_te2_` CLIP-G, `lora_te3_` T5 with `train_t5xxl=True`). `networks.lora` (the SD3
  guide's command) gets the same targets.
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
    TextConditioning,
)
from lorakit.families.common.flow_metadata import weighting_metadata
from lorakit.families.common.layers import fp8_parts, to_fp8
from lorakit.families.common.text_encoders import clip_targets, t5_targets
from lorakit.families.common.transformer_family import (
    BlockSwapFamily,
    ShiftScaleLatents,
    note_block_swap,
    t5_family_problems,
    t5_family_warnings,
    trains_t5,
)
from lorakit.families.sd3 import pos_embed as scaled_pos_embed
from lorakit.families.sd3.conditioning import (
    WIDTH_KEY,
    assemble_conditioning,
    clip_outputs,
    random_position_crop,
    split_outputs,
)
from lorakit.families.sd3.lora_keys import LORA_LAYOUT
from lorakit.families.sd3.network_args import KNOWN_KEYS, SD3NetworkArgs
from lorakit.families.sd3.objective import SD3FlowObjective, precondition_to_x0
from lorakit.families.sd3.targets import mmdit_targets
from lorakit.precision import load_dtype
from lorakit.transfer import to_device

log = logging.getLogger("lorakit")

TEXT_PREFIXES = ("lora_te1", "lora_te2", "lora_te3")
T5_MAX_LENGTH = 256  # sd-scripts' SD3 default for --t5xxl_max_token_length
SD_ONLY_OPTIONS = ("v_parameterization", "clip_skip")
MODELSPEC_IMPLEMENTATION = "diffusers"  # what sd-scripts writes for SD3 LoRAs
MODEL_TYPES = ("medium", "5-medium", "5-large")


class StableDiffusion3Family(ShiftScaleLatents, BlockSwapFamily, ModelFamily):
    """SD3 Medium, SD3.5 Medium (MMDiT-X) and SD3.5 Large, with CLIP-L, CLIP-G and T5-XXL."""

    name = "sd3"
    title = "SD3"
    large_text_encoders = (2,)  # what --base_quant quantizes besides the denoiser
    trains_whole_model = True
    default_network_module = "networks.lora_sd3"
    lora_network_modules = ("networks.lora_sd3",)
    bucket_step = 32
    all_layers_args = {"emb_dims": "[1,1,1,1,1,1]", "train_t5xxl": "True"}
    oft_attention = re.compile(r"_attn_(qkv|proj)$")
    lora_hints = (LoraHint(10, ("lora_unet_joint_blocks_", "lora_unet_context_embedder", "lora_unet_x_embedder_")),
                  LoraHint(30, ("transformer.transformer_blocks.",)))
    architecture_fragments = ("stable-diffusion-3",)
    inference = InferenceDefaults(steps=30, guidance_scale=5.0, resolution=1024)
    part_files = ("vae", "clip_l", "clip_g", "t5xxl")
    freezes_last_blocks = True  # sd3_train.py's --num_last_block_to_freeze
    single_file_kinds = ("safetensors",)
    single_file_without_encoders = True  # SAI's sd3_medium.safetensors holds the MMDiT and the VAE alone
    single_file_denoiser_prefixes = ("model.diffusion_model.",)
    save_formats = ("kohya", "diffusers")
    uses_own_scheduler = True
    # T5 modules: ComfyUI maps them under its own name (what lorakit writes), not diffusers-style ones; diffusers
    # ignores T5 LoRA modules whatever their names
    comfy_drops = {r"^text_encoder_3\.encoder\.": "T5 modules under diffusers-style names"}
    diffusers_skips = {r"^(text_encoders\.t5xxl\.|text_encoder_3\.encoder\.)": "T5 modules"}
    webui_kohya = "no (A1111 1.10+ reads SD3 only in the diffusers layout; Forge has no SD3)"
    webui_diffusers = "A1111 1.10+ only (Forge has no SD3)"
    diffusers_kohya = "no (convert: lorakit lora convert --to diffusers)"

    def __init__(self) -> None:
        self.model_type = "medium"
        self.text_cache: CaptionCache | None = None
        self.cache_clip = False

    @property
    def latent_format(self) -> LatentFileFormat:
        # sd-scripts stores the raw VAE sample, before the shift and scale
        return LatentFileFormat("_sd3.npz", True, 1.5305, 0.0609)

    @property
    def text_cache_format(self) -> TextFileFormat:
        return TextFileFormat(
            "_sd3_te.npz", ("lg_out", "lg_pooled", "t5_out", "clip_l_attn_mask", "clip_g_attn_mask", "t5_attn_mask"),
            switches=("apply_lg_attn_mask", "apply_t5_attn_mask"), settings=("t5xxl_max_token_length",),
            encoder_files=("clip_l", "clip_g", "t5xxl"),
        )

    @property
    def lora_layout(self):
        return LORA_LAYOUT

    def owns_checkpoint(self, path: str) -> bool:
        from lorakit.families.sd3.detect import is_sd3_checkpoint

        return is_sd3_checkpoint(path)

    def option_problems(self, cfg: Any, spec: TargetSpec | None = None) -> list[str]:
        """SD 1.x/2.x options have no meaning for SD3; T5 training and cached outputs exclude each other."""
        problems = super().option_problems(cfg, spec)
        problems += [f"--{name} is an SD 1.x/2.x option; SD3/3.5 is trained without it (remove it)"
                     for name in SD_ONLY_OPTIONS if getattr(cfg, name, None)]
        return problems + t5_family_problems(self.name, cfg, spec)

    def option_warnings(self, cfg: Any) -> list[str]:
        return t5_family_warnings(self.name, cfg)

    def parse_network_args(self, args: Mapping[str, str], spec: TargetSpec) -> tuple[Any, list[str]]:
        return SD3NetworkArgs.parse(args, spec.rank)

    def family_arg_keys(self, module: str) -> frozenset[str] | None:
        return KNOWN_KEYS if reads_family_args(self.network_module(module), self) else None

    # ----------------------------------------------------------------------------------------- loading

    def load(self, cfg: Any, spec: TargetSpec | None = None, text_cache: CaptionCache | None = None) -> Components:
        self.text_cache = run_text_cache(cfg, text_cache)
        comps = self.load_model(ModelSource(
            cfg.pretrained_model_name_or_path, {k: getattr(cfg, k) for k in self.part_files if getattr(cfg, k)},
            load_dtype(cfg), fp8=fp8_parts(cfg), tokenizer_cache_dir=cfg.tokenizer_cache_dir,
            text_encoders=self.text_cache is None or self.text_cache.needs_encoders,
        ))
        # with CLIP-L/G LoRAs training, only T5's outputs are cached and the CLIPs run every step (sd-scripts' partial caching)
        self.cache_clip = not (spec is not None and spec.train_text_encoder)
        comps.extras.update(self._conditioning_options(cfg, comps))
        comps.extras["train_t5xxl"] = trains_t5(spec)
        if cfg.enable_scaled_pos_embed:
            scaled_pos_embed.enable_scaled_pos_embed(
                comps.denoiser, comps.vae, scaled_pos_embed.dataset_resolutions(cfg), self.model_type)
        self._check_block_swap(cfg, comps)
        return comps

    def load_model(self, source: ModelSource) -> Components:
        from lorakit.families.sd3.loading import load_sd3_components
        from lorakit.families.sd3.model_files import load_sai_parts

        dtype = source.dtype or torch.float32
        if source.partial and not Path(source.path).is_dir():
            comps = load_sai_parts(source.path, dtype, source.files)  # the tools work on whatever parts are given
        else:
            files = source.files
            comps = load_sd3_components(source.path, clip_l=files.get("clip_l"), clip_g=files.get("clip_g"),
                                        t5xxl=files.get("t5xxl"), vae=files.get("vae"), dtype=dtype,
                                        text_encoders=source.text_encoders,
                                        tokenizer_cache_dir=source.tokenizer_cache_dir)
        self.model_type = comps.extras["model_type"]
        if source.fp8:
            layers = to_fp8(comps.denoiser)
            if source.fp8 == "all" and comps.text_encoders:
                layers += to_fp8(comps.text_encoders[2])  # sd-scripts keeps the CLIPs out of fp8 (always)
            log.info("--fp8_base: %d linear layers store float8_e4m3fn weights", layers)
        return comps

    @staticmethod
    def _conditioning_options(cfg: Any, comps: Components) -> dict[str, Any]:
        # the tokenizer's own limit wins over the default (lorakit's tiny test tokenizer stops at 32); without
        # tokenizers the captions' outputs are all cached and no length is needed
        default_length = min(T5_MAX_LENGTH, comps.tokenizers[2].model_max_length) if comps.tokenizers else T5_MAX_LENGTH
        return {
            "t5_max_length": cfg.t5xxl_max_token_length or default_length,
            "apply_lg_attn_mask": bool(cfg.apply_lg_attn_mask),
            "apply_t5_attn_mask": bool(cfg.apply_t5_attn_mask),
            "dropout_rates": (float(cfg.clip_l_dropout_rate), float(cfg.clip_g_dropout_rate), float(cfg.t5_dropout_rate)),
            "pos_emb_random_crop_rate": float(cfg.pos_emb_random_crop_rate),
        }

    @staticmethod
    def _check_block_swap(cfg: Any, comps: Components) -> None:
        """sd-scripts' limit (N ≤ blocks − 2), then the plan: the last N joint blocks on the CPU
        (`common/block_swap.py`; installed on the device by the first `predict`)."""
        swap = cfg.blocks_to_swap or 0
        if not swap:
            return
        blocks = comps.denoiser.config.num_layers
        if swap > blocks - 2:
            raise ConfigError([f"--blocks_to_swap {swap}: this model has {blocks} joint blocks, so at most {blocks - 2} can be swapped"])
        note_block_swap(comps, [("joint blocks", "transformer_blocks", swap)])

    def objective(self, cfg: Any, comps: Components) -> SD3FlowObjective:
        return SD3FlowObjective.from_options(cfg)

    # ----------------------------------------------------------------------------------------- text

    def encode_text(self, comps: Components, captions: list[str], clip_skip: int | None = None) -> TextConditioning:
        """`context` (B, 77 + T5 length, T5 width) and `pooled` (B, CLIP-L + CLIP-G projection widths).

        With --cache_text_encoder_outputs each distinct caption is encoded once (the encoders are frozen then);
        the per-encoder dropout still draws anew every step, as sd-scripts applies it to cached outputs too.
        """
        if self.text_cache is None:
            outputs = self.text_encoder_outputs(comps, captions)
        elif self.cache_clip:
            outputs = self.text_cache.outputs(captions, lambda texts: self.text_encoder_outputs(comps, texts))
        else:  # the trained CLIPs run every step, with gradients; only T5 is encoded for the cache
            outputs = self.text_cache.outputs(captions, lambda texts: self._t5_part(comps, texts))
            fresh = self._clip_parts(comps, captions)
            device = fresh["lg_out"].device
            outputs = {**{k: v.to(device) for k, v in outputs.items()}, **fresh}
        extras = comps.extras
        parts = split_outputs(outputs, extras["apply_lg_attn_mask"], extras["apply_t5_attn_mask"])
        return TextConditioning(assemble_conditioning(parts, extras["dropout_rates"], self.training_dropout))

    training_dropout = True  # the sampling pipeline turns it off

    def text_encoder_outputs(self, comps: Components, captions: list[str], clip_skip: int | None = None
                             ) -> dict[str, torch.Tensor]:
        """sd-scripts' `lg_out` (CLIP-L‖G penultimate states), `lg_pooled`, `t5_out` and the three token masks."""
        return {**self._clip_parts(comps, captions), **self._t5_part(comps, captions)}

    @staticmethod
    def _clip_parts(comps: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        (clip_l, clip_g, _), (tok_l, tok_g, _) = comps.text_encoders, comps.tokenizers
        mask = comps.extras["apply_lg_attn_mask"]
        l_hidden, l_pooled, l_mask = clip_outputs(clip_l, tok_l, captions, mask)
        g_hidden, g_pooled, g_mask = clip_outputs(clip_g, tok_g, captions, mask)
        widths = torch.tensor([l_hidden.shape[-1], l_pooled.shape[-1]]).expand(len(captions), 2)
        return {"lg_out": torch.cat([l_hidden, g_hidden.to(l_hidden.dtype)], dim=-1),
                "lg_pooled": torch.cat([l_pooled, g_pooled.to(l_pooled.dtype)], dim=-1),
                "clip_l_attn_mask": l_mask, "clip_g_attn_mask": g_mask, WIDTH_KEY: widths}

    @staticmethod
    def _t5_part(comps: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        t5, tok_t5, extras = comps.text_encoders[2], comps.tokenizers[2], comps.extras
        tokens = tok_t5(captions, padding="max_length", max_length=extras["t5_max_length"], truncation=True, return_tensors="pt")
        mask = to_device(tokens.attention_mask, t5.device)
        use_mask = extras["apply_t5_attn_mask"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and extras.get("train_t5xxl", False)):
            hidden = t5(to_device(tokens.input_ids, t5.device), attention_mask=mask if use_mask else None).last_hidden_state
        return {"t5_out": hidden, "t5_attn_mask": mask}

    # ----------------------------------------------------------------------------------------- prediction

    def predict(self, comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning, batch: Any) -> torch.Tensor:
        """The x₀ estimate x_σ − σ·v from the MMDiT's velocity v (timesteps on the 0..1000 scale, as trained)."""
        self.prepare_block_swap(comps, None, noisy.device)  # once, with --blocks_to_swap
        transformer = comps.denoiser
        dtype = noisy.dtype
        crop_rate = comps.extras.get("pos_emb_random_crop_rate", 0.0) if transformer.training else 0.0
        with random_position_crop(transformer, crop_rate):
            velocity = transformer(
                hidden_states=noisy, encoder_hidden_states=text.tensors["context"].to(dtype),
                pooled_projections=text.tensors["pooled"].to(dtype), timestep=timesteps.to(dtype), return_dict=False,
            )[0]
        return precondition_to_x0(velocity, noisy, timesteps.float() / 1000.0)

    # ----------------------------------------------------------------------------------------- adapters

    def adapter_targets(self, comps: Components, spec: TargetSpec) -> list[AdapterTarget]:
        args: SD3NetworkArgs = spec.family_args
        transformer = comps.denoiser
        args.check_blocks(transformer.config.num_layers)
        alpha = spec.alpha_option or None
        targets: list[AdapterTarget] = []
        if spec.train_unet:
            targets += mmdit_targets(transformer, args, alpha)
        if spec.train_text_encoder:
            ranks = RankChoice(args.network_dim, alpha or float(args.network_dim))
            clip_l, clip_g, t5 = comps.text_encoders
            targets += clip_targets(clip_l, "lora_te1", ranks) + clip_targets(clip_g, "lora_te2", ranks)
            if args.train_t5xxl:
                targets += t5_targets(t5, "lora_te3", ranks)
        return targets

    def text_encoders_to_train(self, comps: Components, spec: TargetSpec) -> list[torch.nn.Module]:
        if not spec.train_text_encoder:
            return []
        clip_l, clip_g, t5 = comps.text_encoders
        return [clip_l, clip_g, t5] if spec.family_args.train_t5xxl else [clip_l, clip_g]

    def text_encoder_lr_groups(self, cfg: Any) -> dict[str, float | None]:
        """Up to three --text_encoder_lr values for lora_te1 / lora_te2 / lora_te3 (sd-scripts'
        `lora_sd3.prepare_optimizer_params_with_multiple_te_lrs`): one value applies to all three encoders,
        two are [CLIP-L, CLIP-G] with T5 at the second (CLIP-G's), three are one each."""
        values = list(cfg.text_encoder_lr or [])
        if not values:
            return dict.fromkeys(TEXT_PREFIXES)
        if len(values) > 3:
            raise ConfigError([f"--text_encoder_lr: SD3 takes at most 3 values (CLIP-L, CLIP-G, T5), got {len(values)}"])
        padded = values + [values[-1]] * (3 - len(values))
        return dict(zip(TEXT_PREFIXES, padded))

    def enable_gradient_checkpointing(self, comps: Components, train_text_encoder: bool) -> None:
        comps.denoiser.enable_gradient_checkpointing()
        if train_text_encoder:
            for encoder in comps.text_encoders[: 3 if comps.extras.get("train_t5xxl") else 2]:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    text_mask_options = ("apply_lg_attn_mask", "apply_t5_attn_mask")

    def masked_prompt_inputs(self, comps: Components, prompt: str, negative: str, masks: frozenset[str]) -> dict[str, Any]:
        from lorakit.families.sd3.masked_text import masked_prompt_inputs

        return masked_prompt_inputs(comps, prompt, negative, "apply_lg_attn_mask" in masks, "apply_t5_attn_mask" in masks)

    def pipeline(self, comps: Components, sampler: str | None = None) -> Any:
        """A diffusers StableDiffusion3Pipeline over these very modules (flow Euler, shift 3, as SD3 samples)."""
        from lorakit.families.sd3.model_files import pipeline_of

        return pipeline_of(comps)

    def lora_file_state(self, state: dict[str, torch.Tensor], metadata: dict[str, str], save_format: str
                        ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and metadata to write: kohya layout, or the diffusers/PEFT one with --save_format diffusers."""
        if save_format != "diffusers":
            return state, metadata
        from lorakit.families.sd3.lora_convert import kohya_to_diffusers

        return kohya_to_diffusers(state, metadata)

    def lora_to_diffusers(self, state, metadata, *, keep_alpha: bool = False):
        from lorakit.families.sd3.lora_convert import to_peft

        return to_peft(state, metadata, keep_alpha=keep_alpha)

    def lora_from_diffusers(self, state, metadata):
        from lorakit.families.sd3.lora_convert import from_peft

        return from_peft(state, metadata)

    # ----------------------------------------------------------------------------------------- metadata

    def metadata(self, cfg: Any) -> dict[str, str]:
        """sd-scripts' SD3 `ss_*` keys."""
        return {
            "ss_base_model_version": self.model_type,
            "ss_v2": "False",
            "ss_apply_lg_attn_mask": str(bool(cfg.apply_lg_attn_mask)),
            "ss_apply_t5_attn_mask": str(bool(cfg.apply_t5_attn_mask)),
            **weighting_metadata(cfg),
        }

    def base_model(self, version: str | None, *, variant: str | None = None, v_prediction: bool = False) -> BaseModelFacts:
        """`stable-diffusion-3-medium`, `stable-diffusion-3-5-medium` or `stable-diffusion-3-5-large`; sd-scripts
        writes the prediction type `epsilon` for SD3 files too (only FLUX files leave it out)."""
        version = version if version in MODEL_TYPES else "medium"
        return BaseModelFacts(version, f"stable-diffusion-3-{version}", MODELSPEC_IMPLEMENTATION, 1024, "epsilon")

    def version_of(self, source: ModelSource, comps: Components) -> str:
        return comps.extras.get("model_type", "medium")

    # ----------------------------------------------------------------------------------------- whole-model files

    def save_single_file(self, comps: Components, path: Path, kind: str, dtype: torch.dtype | None = None) -> None:
        from lorakit.families.sd3.model_files import save_sai_single_file

        save_sai_single_file(comps, path, dtype)

    def save_folder(self, comps: Components, path: Path) -> None:
        from lorakit.checkpoint_io import save_pipeline_atomic
        from lorakit.families.sd3.model_files import pipeline_of

        if any(part is None for part in (comps.vae, *comps.text_encoders)) or not comps.tokenizers:
            raise ConfigError([f"--save_to {path}: a diffusers folder needs the whole pipeline; this SD3 model was read "
                               "from single files, so save it as .safetensors"])
        save_pipeline_atomic(pipeline_of(comps), path)

    def checkpoint_parts(self, comps: Components) -> tuple[str, ...]:
        from lorakit.families.sd3.model_files import present_parts

        return present_parts(comps)

    def checkpoint_pieces(self, comps: Components, parts: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
        from lorakit.families.sd3.model_files import sai_part_state

        for part in parts:
            yield sai_part_state(comps, part)

    def parameters_to_freeze(self, comps: Components, last_blocks: int) -> list[str]:
        from lorakit.families.sd3.model_files import frozen_x_block_parameters

        return frozen_x_block_parameters(dict(comps.denoiser.config), last_blocks)


