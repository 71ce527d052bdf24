"""SD3 / SD3.5 (Medium, Large): loading, three-encoder conditioning, flow-matching prediction, LoRA targets.

As sd-scripts' `sd3_train_network.py` (Esser et al. 2024, "Scaling Rectified Flow Transformers",
arXiv:2403.03206):
- latents are the 16-channel VAE's, normalised as (z − shift)·scale (SD3's VAE: 0.0609, 1.5305);
- the text tokens are CLIP-L's and CLIP-G's penultimate hidden states, concatenated (768 + 1280 wide), padded
  with zeros to T5's width and followed by T5-XXL's last hidden states (256 tokens by default); the global
  vector is both CLIPs' projected pooled outputs, concatenated. `--apply_lg_attn_mask` / `--apply_t5_attn_mask`
  hide padding inside the encoders and zero the padded outputs; `--clip_l/clip_g/t5_dropout_rate` zero one
  encoder's part of the conditioning per sample;
- the MMDiT's velocity is preconditioned to an x₀ estimate, as `objectives/sd3_flow.py` explains;
- LoRA targets follow `networks.lora_sd3` with SAI names (`lora_unet_joint_blocks_0_x_block_attn_qkv`,
  `lora_te1_` CLIP-L, `lora_te2_` CLIP-G, `lora_te3_` T5 with `train_t5xxl=True`). `networks.lora` (the SD3
  guide's command) gets the same targets.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lorakit.errors import ConfigError
from lorakit.families.base import AdapterTarget, Components, TextConditioning
from lorakit.families.common.layers import FusedLinearView, to_fp8
from lorakit.families.common.text_cache import CaptionCache, caches_text
from lorakit.families.common.transformer_family import (
    CLIP_PARENTS,
    T5_PARENTS,
    BlockSwapFamily,
    ShiftScaleLatents,
    note_block_swap,
)
from lorakit.families.sd3 import pos_embed as scaled_pos_embed
from lorakit.families.sd3 import sai_keys
from lorakit.families.sd3.layers import SplitQKVView, SwappedRowsView
from lorakit.families.sd3.network_args import SD3NetworkArgs
from lorakit.families.targeting import RankChoice, collect_targets
from lorakit.objectives.sd3_flow import SD3FlowObjective, precondition_to_x0
from lorakit.precision import load_dtype
from lorakit.transfer import to_device

log = logging.getLogger("lorakit")

TEXT_PREFIXES = ("lora_te1", "lora_te2", "lora_te3")
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 256  # sd-scripts' SD3 default for --t5xxl_max_token_length
SD_ONLY_OPTIONS = ("v2", "v_parameterization", "clip_skip")
MODELSPEC_IMPLEMENTATION = "diffusers"  # what sd-scripts writes for SD3 LoRAs


class StableDiffusion3Family(ShiftScaleLatents, BlockSwapFamily):
    """SD3 Medium, SD3.5 Medium (MMDiT-X) and SD3.5 Large, with CLIP-L, CLIP-G and T5-XXL."""

    name = "sd3"
    default_network_module = "networks.lora_sd3"  # sd-scripts' LoRA module for this family

    def __init__(self) -> None:
        self.model_type = "medium"
        self.text_cache: CaptionCache | None = None
        self.cache_clip = False

    # ----------------------------------------------------------------------------------------- loading

    def load(self, cfg: Any) -> Components:
        from lorakit.families.sd3.loading import load_sd3_components

        self._check_options(cfg)
        comps = load_sd3_components(
            cfg.pretrained_model_name_or_path, clip_l=cfg.clip_l, clip_g=cfg.clip_g, t5xxl=cfg.t5xxl, vae=cfg.vae,
            dtype=load_dtype(cfg),
        )
        self.model_type = comps.extras["model_type"]
        comps.extras.update(self._conditioning_options(cfg, comps))
        if cfg.enable_scaled_pos_embed:
            scaled_pos_embed.enable_scaled_pos_embed(
                comps.denoiser, comps.vae, scaled_pos_embed.dataset_resolutions(cfg), self.model_type)
        self._check_block_swap(cfg, comps)
        if cfg.fp8_base or cfg.fp8_base_unet:
            layers = to_fp8(comps.denoiser)
            if not cfg.fp8_base_unet:
                layers += to_fp8(comps.text_encoders[2])  # sd-scripts keeps the CLIPs out of fp8 (always)
            log.info("--fp8_base: %d linear layers store float8_e4m3fn weights", layers)
        return comps

    def _check_options(self, cfg: Any) -> None:
        """SD 1.x/2.x options have no meaning for SD3; T5 training and cached outputs exclude each other."""
        problems = [
            f"--{name} is an SD 1.x/2.x option; SD3/3.5 is trained without it (remove it)"
            for name in SD_ONLY_OPTIONS if getattr(cfg, name, None)
        ]
        caching = caches_text(cfg)
        args = SD3NetworkArgs.from_config(cfg)
        if caching and args.train_t5xxl and not cfg.network_train_unet_only:
            problems.append("--network_args train_t5xxl=True cannot be used with --cache_text_encoder_outputs: "
                            "cached outputs carry no gradients to T5's LoRA modules")
        if problems:
            raise ConfigError(problems)
        self.text_cache = CaptionCache() if caching else None
        # with CLIP-L/G LoRAs training, only T5's outputs are cached and the CLIPs run every step (sd-scripts' partial caching)
        self.cache_clip = bool(cfg.network_train_unet_only)

    @staticmethod
    def _conditioning_options(cfg: Any, comps: Components) -> dict[str, Any]:
        # the tokenizer's own limit wins over the default (lorakit's tiny test tokenizer stops at 32)
        default_length = min(T5_MAX_LENGTH, comps.tokenizers[2].model_max_length)
        return {
            "t5_max_length": cfg.t5xxl_max_token_length or default_length,
            "apply_lg_attn_mask": bool(cfg.apply_lg_attn_mask),
            "apply_t5_attn_mask": bool(cfg.apply_t5_attn_mask),
            "dropout_rates": (float(cfg.clip_l_dropout_rate), float(cfg.clip_g_dropout_rate), float(cfg.t5_dropout_rate)),
            "pos_emb_random_crop_rate": float(cfg.pos_emb_random_crop_rate),
            "train_t5xxl": SD3NetworkArgs.from_config(cfg).train_t5xxl and not cfg.network_train_unet_only,
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
            parts = {**self._clip_parts(comps, captions), **self._t5_part(comps, captions)}
        elif self.cache_clip:
            parts = self.text_cache.outputs(captions, lambda texts: {**self._clip_parts(comps, texts), **self._t5_part(comps, texts)})
        else:
            parts = {**self._clip_parts(comps, captions), **self.text_cache.outputs(captions, lambda texts: self._t5_part(comps, texts))}
        return TextConditioning(assemble_conditioning(parts, comps.extras["dropout_rates"], self.training_dropout))

    training_dropout = True  # the sampling pipeline turns it off

    @staticmethod
    def _clip_parts(comps: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        (clip_l, clip_g, _), (tok_l, tok_g, _) = comps.text_encoders, comps.tokenizers
        mask = comps.extras["apply_lg_attn_mask"]
        l_hidden, l_pooled = _clip_outputs(clip_l, tok_l, captions, mask)
        g_hidden, g_pooled = _clip_outputs(clip_g, tok_g, captions, mask)
        return {"l": l_hidden, "g": g_hidden, "l_pooled": l_pooled, "g_pooled": g_pooled}

    @staticmethod
    def _t5_part(comps: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        t5, tok_t5, extras = comps.text_encoders[2], comps.tokenizers[2], comps.extras
        tokens = tok_t5(captions, padding="max_length", max_length=extras["t5_max_length"], truncation=True, return_tensors="pt")
        mask = to_device(tokens.attention_mask, t5.device)
        use_mask = extras["apply_t5_attn_mask"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and extras.get("train_t5xxl", False)):
            hidden = t5(to_device(tokens.input_ids, t5.device), attention_mask=mask if use_mask else None).last_hidden_state
        if use_mask:
            hidden = hidden * mask[..., None].to(hidden.dtype)
        return {"t5": hidden}

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

    def adapter_targets(self, comps: Components, cfg: Any) -> list[AdapterTarget]:
        args = SD3NetworkArgs.from_config(cfg)
        transformer = comps.denoiser
        args.check_blocks(transformer.config.num_layers)
        alpha = cfg.network_alpha or None
        targets: list[AdapterTarget] = []
        if not cfg.network_train_text_encoder_only:
            targets += mmdit_targets(transformer, args, alpha)
        if not cfg.network_train_unet_only:
            ranks = RankChoice(args.network_dim, alpha or float(args.network_dim))
            encoders = list(zip(TEXT_PREFIXES, comps.text_encoders, (CLIP_PARENTS, CLIP_PARENTS, T5_PARENTS)))
            for prefix, encoder, parents in encoders[: 3 if args.train_t5xxl else 2]:
                path_prefix = "text_model." if parents is CLIP_PARENTS and not hasattr(encoder, "text_model") else ""
                targets += collect_targets(encoder, prefix=prefix, component="text_encoder", parent_classes=parents, ranks=ranks, path_prefix=path_prefix)
        return targets

    def text_encoders_to_train(self, comps: Components, cfg: Any) -> list[torch.nn.Module]:
        if cfg.network_train_unet_only:
            return []
        clip_l, clip_g, t5 = comps.text_encoders
        return [clip_l, clip_g, t5] if SD3NetworkArgs.from_config(cfg).train_t5xxl else [clip_l, clip_g]

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

    def pipeline(self, comps: Components, sampler: str = "euler") -> Any:
        """A diffusers StableDiffusion3Pipeline over these very modules (flow Euler, shift 3, as SD3 samples)."""
        from lorakit.families.sd3.tiny import pipeline_of

        return pipeline_of(comps)

    def lora_file_state(self, state: dict[str, torch.Tensor], metadata: dict[str, str], cfg: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and metadata to write: kohya layout, or the diffusers/PEFT one with --save_format diffusers."""
        if getattr(cfg, "save_format", "kohya") != "diffusers":
            return state, metadata
        from lorakit.families.sd3.lora_convert import kohya_to_diffusers

        return kohya_to_diffusers(state, metadata)

    # ----------------------------------------------------------------------------------------- metadata

    def metadata(self, cfg: Any) -> dict[str, str]:
        """sd-scripts' SD3 `ss_*` keys."""
        return {
            "ss_base_model_version": self.model_type,
            "ss_v2": "False",
            "ss_apply_lg_attn_mask": str(bool(cfg.apply_lg_attn_mask)),
            "ss_apply_t5_attn_mask": str(bool(cfg.apply_t5_attn_mask)),
            "ss_weighting_scheme": str(cfg.weighting_scheme),
            "ss_logit_mean": str(cfg.logit_mean),
            "ss_logit_std": str(cfg.logit_std),
            "ss_mode_scale": str(cfg.mode_scale),
        }

    def modelspec_prediction_type(self, cfg: Any) -> str | None:
        return None

    def modelspec_architecture(self, cfg: Any) -> tuple[str, str, tuple[int, int]]:
        """`stable-diffusion-3-medium`, `stable-diffusion-3-5-medium` or `stable-diffusion-3-5-large`."""
        return f"stable-diffusion-3-{self.model_type}", MODELSPEC_IMPLEMENTATION, (1024, 1024)


# ---------------------------------------------------------------------------------------------------------
# Conditioning (pure functions of encoder outputs)
# ---------------------------------------------------------------------------------------------------------


def _clip_outputs(encoder: torch.nn.Module, tokenizer: Any, captions: list[str], use_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate hidden states (padding zeroed under the mask option) and the projected pooled output."""
    tokens = tokenizer(captions, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt")
    ids, mask = to_device(tokens.input_ids, encoder.device), to_device(tokens.attention_mask, encoder.device)
    out = encoder(ids, attention_mask=mask if use_mask else None, output_hidden_states=True)
    hidden = out.hidden_states[-2]
    if use_mask:
        hidden = hidden * mask[..., None].to(hidden.dtype)
    return hidden, out.text_embeds


def assemble_conditioning(parts: dict[str, torch.Tensor], dropout_rates: tuple[float, float, float], training: bool) -> dict[str, torch.Tensor]:
    """SD3's context [CLIP-L‖CLIP-G zero-padded to T5 width ; T5] and pooled [L ; G], with per-encoder dropout.

    Dropout zeroes one encoder's hidden states and pooled vector for a sample with its rate (sd-scripts'
    `--clip_l_dropout_rate` …), so the model also learns the unconditional parts it is sampled with.
    """
    l, g, t5 = parts["l"], parts["g"], parts["t5"]
    l_pooled, g_pooled = parts["l_pooled"], parts["g_pooled"]
    if training:
        keep_l, keep_g, keep_t5 = (_keep_mask(rate, l.shape[0], l.device) for rate in dropout_rates)
        l, l_pooled = _apply(keep_l, l), _apply(keep_l, l_pooled)
        g, g_pooled = _apply(keep_g, g), _apply(keep_g, g_pooled)
        t5 = _apply(keep_t5, t5)
    clip = torch.cat([l, g.to(l.dtype)], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    context = torch.cat([clip, t5.to(clip.dtype)], dim=-2)
    return {"context": context, "pooled": torch.cat([l_pooled, g_pooled.to(l_pooled.dtype)], dim=-1)}


def _keep_mask(rate: float, count: int, device: torch.device) -> torch.Tensor | None:
    if rate <= 0:
        return None
    return (torch.rand(count, device=device) >= rate).float()


def _apply(keep: torch.Tensor | None, tensor: torch.Tensor) -> torch.Tensor:
    if keep is None:
        return tensor
    return tensor * keep.to(tensor.dtype).view((-1,) + (1,) * (tensor.ndim - 1))


class random_position_crop:
    """`--pos_emb_random_crop_rate`: with that probability, the positional-embedding window is taken at a random
    place of the max-size grid instead of its centre (SD3.5 Medium was trained so; it helps other resolutions).

    diffusers' PatchEmbed crops the centre; for one call its `cropped_pos_embed` is replaced by a random crop, of
    the scaled table for the latent's size under `--enable_scaled_pos_embed` (as sd-scripts), else of the fixed one.
    """

    def __init__(self, transformer: torch.nn.Module, rate: float):
        self.embed = transformer.pos_embed
        self.scaled = getattr(self.embed, "scaled_pos_embeds", None)
        croppable = self.scaled is not None or getattr(self.embed, "pos_embed_max_size", None)
        self.active = rate > 0 and croppable and bool(torch.rand(()) < rate)
        self.previous = None

    def __enter__(self) -> None:
        if not self.active:
            return
        embed, size, scaled = self.embed, self.embed.pos_embed_max_size, self.scaled
        self.previous = embed.__dict__.get("cropped_pos_embed")

        def cropped(height: int, width: int) -> torch.Tensor:
            if scaled is not None:
                return scaled.window(height, width, random_crop=True, device=embed.proj.weight.device)
            h, w = height // embed.patch_size, width // embed.patch_size
            top = int(torch.randint(0, size - h + 1, ()))
            left = int(torch.randint(0, size - w + 1, ()))
            grid = embed.pos_embed.reshape(1, size, size, -1)[:, top:top + h, left:left + w, :]
            return grid.reshape(1, -1, grid.shape[-1])

        embed.cropped_pos_embed = cropped

    def __exit__(self, *exc: object) -> None:
        if not self.active:
            return
        if self.previous is not None:
            self.embed.cropped_pos_embed = self.previous  # the scaled tables' centre window
        else:
            del self.embed.cropped_pos_embed


# ---------------------------------------------------------------------------------------------------------
# MMDiT targets
# ---------------------------------------------------------------------------------------------------------


def mmdit_targets(transformer: torch.nn.Module, args: SD3NetworkArgs, alpha: float | None) -> list[AdapterTarget]:
    """`networks.lora_sd3`'s targets on diffusers' SD3Transformer2DModel, named and shaped as SAI layers."""
    targets: list[AdapterTarget] = []
    for layer in sai_keys.lora_layers(dict(transformer.config)):
        if layer.lora_kind == "emb":
            dims = args.emb_dims or ()
            slot = sai_keys.emb_slot(layer.sai)
            rank = dims[slot] if slot < len(dims) else 0
        else:
            rank = args.rank_for(layer.lora_kind, layer.block)
        if not rank:
            continue
        modules = [transformer.get_submodule(path) for path in layer.diffusers]
        layer_alpha = alpha or float(rank)
        if len(modules) > 1 and args.split_qkv:
            # one LoRA per q/k/v, saved block-diagonally at rank 3r; alpha 3α keeps each part's scale α/r
            module, rank, layer_alpha = SplitQKVView(modules), 3 * rank, 3 * layer_alpha
        elif len(modules) > 1:
            module = FusedLinearView(modules)
        elif layer.swapped:
            module = SwappedRowsView(modules[0])
        else:
            module = modules[0]
        targets.append(AdapterTarget(sai_keys.kohya_name(layer.sai), module, "unet", rank, layer_alpha))
    return targets

