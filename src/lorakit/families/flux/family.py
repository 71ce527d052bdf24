"""FLUX.1 (dev, schnell): loading, conditioning, flow-matching prediction and LoRA targets.

Conditioning as in Black Forest Labs' reference and sd-scripts' flux_train_network.py: the autoencoder latent
normalised as (z − shift)·scale and packed into 2×2 patches (64 channels per token) with (0, row, col) position
ids; CLIP-L's pooled output as the global vector; T5-XXL's last hidden states as the text tokens (ids zero);
the guidance embedding fed `--guidance_scale` (dev only). LoRA targets follow sd-scripts' `networks.lora_flux`
with BFL names (`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`, `lora_te1_…`
for CLIP-L, `lora_te3_…` for T5 with `train_t5xxl=True`), the names ComfyUI, Forge and diffusers load.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lorakit.errors import ConfigError
from lorakit.families.base import AdapterTarget, Components, TextConditioning
from lorakit.families.flux import bfl_keys
from lorakit.families.common.layers import FusedLinearView, SplitQKVView, to_fp8
from lorakit.families.common.text_cache import CaptionCache, caches_text
from lorakit.families.common.transformer_family import (
    CLIP_PARENTS,
    T5_PARENTS,
    BlockSwapFamily,
    ShiftScaleLatents,
    note_block_swap,
)
from lorakit.families.flux.layers import checkpoint_offloading_to_cpu
from lorakit.families.flux.network_args import FluxNetworkArgs
from lorakit.families.targeting import RankChoice, collect_targets
from lorakit.objectives.flow import FlowObjective, apply_model_prediction_type, timesteps_to_sigmas
from lorakit.precision import load_dtype
from lorakit.transfer import to_device

log = logging.getLogger("lorakit")

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = {"dev": 512, "schnell": 256}  # sd-scripts' defaults for --t5xxl_max_token_length
PATCH = 2  # latents are packed into 2x2 patches


# ---------------------------------------------------------------------------------------------------------
# Latent packing (pure functions)
# ---------------------------------------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2·W/2, 4C): each 2×2 patch becomes one token, channels outermost."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `height`×`width`."""
    b, _, features = tokens.shape
    c = features // (PATCH * PATCH)
    grid = tokens.view(b, height // PATCH, width // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(b, c, height, width)


def image_position_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H/2·W/2, 3) ids (0, row, col) per packed token, the RoPE positions FLUX was trained with."""
    rows, cols = height // PATCH, width // PATCH
    ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, 3)


def swapped_blocks(blocks_to_swap: int) -> tuple[int, int]:
    """sd-scripts' split of --blocks_to_swap: N//2 double blocks and twice the rest in single blocks
    (a single block holds about half the weights of a double block)."""
    return blocks_to_swap // 2, (blocks_to_swap - blocks_to_swap // 2) * 2


def max_blocks_to_swap(num_double: int, num_single: int) -> int:
    """The largest N whose split leaves at least two blocks of each kind on the GPU (35 for FLUX.1)."""
    most = 0
    for n in range(1, 2 * (num_double + num_single)):
        double, single = swapped_blocks(n)
        if double <= num_double - 2 and single <= num_single - 2:
            most = n
    return most


# ---------------------------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------------------------


class FluxFamily(ShiftScaleLatents, BlockSwapFamily):
    """FLUX.1-dev and -schnell with CLIP-L and T5-XXL."""

    name = "flux"
    default_network_module = "networks.lora_flux"  # sd-scripts' LoRA module for this family

    def load(self, cfg: Any) -> Components:
        from lorakit.families.flux.loading import load_flux_components

        if getattr(cfg, "model_type", "flux") == "chroma":
            raise ConfigError(["--model_type chroma: Chroma is not supported yet; FLUX.1 dev/schnell are"])
        comps = load_flux_components(
            cfg.pretrained_model_name_or_path, clip_l=cfg.clip_l, t5xxl=cfg.t5xxl, ae=cfg.ae, dtype=load_dtype(cfg)
        )
        comps.extras.update(self._conditioning_options(cfg, comps))
        self._variant = comps.extras["variant"]  # modelspec says dev or schnell
        self.text_cache = self._text_cache_for(cfg)
        self._check_block_swap(cfg, comps)
        if cfg.fp8_base or cfg.fp8_base_unet:
            layers = to_fp8(comps.denoiser)
            if not cfg.fp8_base_unet:
                layers += sum(to_fp8(encoder) for encoder in comps.text_encoders)
            log.info("--fp8_base: %d linear layers store float8_e4m3fn weights", layers)
        return comps

    @staticmethod
    def _conditioning_options(cfg: Any, comps: Components) -> dict[str, Any]:
        variant = "schnell" if comps.extras.get("schnell") else "dev"
        # the tokenizer's own limit wins over the default (lorakit's tiny test tokenizer stops at 32)
        default_length = min(T5_MAX_LENGTH[variant], comps.tokenizers[1].model_max_length)
        return {
            "variant": variant,
            "guidance_scale": float(cfg.guidance_scale),
            "t5_max_length": cfg.t5xxl_max_token_length or default_length,
            "apply_t5_attn_mask": bool(cfg.apply_t5_attn_mask),
            "model_prediction_type": cfg.model_prediction_type,
            "cpu_offload_checkpointing": bool(cfg.cpu_offload_checkpointing),
            "train_t5xxl": FluxNetworkArgs.from_config(cfg).train_t5xxl,
        }

    @staticmethod
    def _check_block_swap(cfg: Any, comps: Components) -> None:
        """sd-scripts' limits on --blocks_to_swap, then the plan: N//2 double and 2·(N − N//2) single blocks
        on the CPU (`common/block_swap.py`; installed on the device by the first `predict`)."""
        swap = cfg.blocks_to_swap or (18 if getattr(cfg, "split_mode", False) else 0)
        if not swap:
            return
        config = comps.denoiser.config
        most = max_blocks_to_swap(config.num_layers, config.num_single_layers)
        if swap > most:
            raise ConfigError([
                f"--blocks_to_swap {swap}: this model ({config.num_layers} double, {config.num_single_layers} single "
                f"blocks) allows at most {most}; FLUX.1 allows 35"
            ])
        double, single = swapped_blocks(swap)
        note_block_swap(comps, [("double blocks", "transformer_blocks", double), ("single blocks", "single_transformer_blocks", single)])

    def objective(self, cfg: Any, comps: Components) -> FlowObjective:
        return FlowObjective.from_options(cfg, patch_size=PATCH)

    text_cache: CaptionCache | None = None
    cache_clip: bool = False  # CLIP-L's pooled output is cached too (no CLIP-L LoRA is trained)

    def _text_cache_for(self, cfg: Any) -> CaptionCache | None:
        """--cache_text_encoder_outputs: T5's outputs always, CLIP-L's too unless CLIP-L trains (sd-scripts' "partial"
        caching: a trained encoder runs every step); a trained T5 cannot be cached."""
        if not caches_text(cfg):
            return None
        if FluxNetworkArgs.from_config(cfg).train_t5xxl and not cfg.network_train_unet_only:
            raise ConfigError(["--network_args train_t5xxl=True cannot be used with --cache_text_encoder_outputs: "
                               "cached outputs carry no gradients to T5's LoRA modules"])
        self.cache_clip = bool(cfg.network_train_unet_only)
        return CaptionCache()

    def encode_text(self, comps: Components, captions: list[str], clip_skip: int | None = None) -> TextConditioning:
        """CLIP-L pooled output and T5 hidden states (`clip_skip` does not apply to FLUX, as in sd-scripts)."""
        if self.text_cache is None:
            return TextConditioning({**self._clip_outputs(comps, captions), **self._t5_outputs(comps, captions)})
        if self.cache_clip:
            cached = self.text_cache.outputs(captions, lambda texts: {**self._clip_outputs(comps, texts), **self._t5_outputs(comps, texts)})
            return TextConditioning(cached)
        cached = self.text_cache.outputs(captions, lambda texts: self._t5_outputs(comps, texts))
        return TextConditioning({**self._clip_outputs(comps, captions), **cached})

    @staticmethod
    def _clip_outputs(comps: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        clip, clip_tok = comps.text_encoders[0], comps.tokenizers[0]
        clip_ids = clip_tok(captions, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
        return {"pooled": clip(to_device(clip_ids, clip.device)).pooler_output}

    @staticmethod
    def _t5_outputs(comps: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        t5, t5_tok = comps.text_encoders[1], comps.tokenizers[1]
        tokens = t5_tok(
            captions, padding="max_length", max_length=comps.extras["t5_max_length"], truncation=True, return_tensors="pt"
        )
        mask = to_device(tokens.attention_mask, t5.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and comps.extras.get("train_t5xxl", False)):
            hidden = t5(to_device(tokens.input_ids, t5.device), attention_mask=mask if comps.extras["apply_t5_attn_mask"] else None).last_hidden_state
        return {"t5": hidden, "t5_mask": mask}

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
        output = transformer(
            hidden_states=pack_latents(noisy),
            encoder_hidden_states=t5,
            pooled_projections=text.tensors["pooled"].to(dtype),
            timestep=sigmas.to(dtype),  # diffusers' Flux multiplies by 1000 inside, as BFL's timestep embedding
            img_ids=image_position_ids(height, width, noisy.device, dtype),
            txt_ids=torch.zeros(t5.shape[1], 3, device=noisy.device, dtype=dtype),
            guidance=guidance,
            joint_attention_kwargs=self._attention_kwargs(comps, text, height, width),
            return_dict=False,
        )[0]
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

    def adapter_targets(self, comps: Components, cfg: Any) -> list[AdapterTarget]:
        args = FluxNetworkArgs.from_config(cfg)
        alpha = cfg.network_alpha or None
        targets: list[AdapterTarget] = []
        if not cfg.network_train_text_encoder_only:
            targets += self._transformer_targets(comps.denoiser, args, alpha)
        if not cfg.network_train_unet_only:
            clip, t5 = comps.text_encoders
            rank = args.network_dim
            ranks = RankChoice(rank, alpha or float(rank))
            path_prefix = "" if hasattr(clip, "text_model") else "text_model."
            targets += collect_targets(clip, prefix="lora_te1", component="text_encoder", parent_classes=CLIP_PARENTS, ranks=ranks, path_prefix=path_prefix)
            if args.train_t5xxl:
                targets += collect_targets(t5, prefix="lora_te3", component="text_encoder", parent_classes=T5_PARENTS, ranks=ranks)
        return targets

    @staticmethod
    def _transformer_targets(transformer: torch.nn.Module, args: FluxNetworkArgs, alpha: float | None) -> list[AdapterTarget]:
        config = transformer.config
        targets: list[AdapterTarget] = []
        for name, bfl_path, parts, kind in bfl_keys.lora_targets_by_block(config.num_layers, config.num_single_layers):
            rank = args.rank_for(bfl_path, kind)
            if not rank:
                continue
            modules = [transformer.get_submodule(p) for p in parts]
            layer_alpha = alpha or float(rank)
            if len(modules) > 1 and args.split_qkv:
                # one rank-r LoRA per part, saved block-diagonally at rank k·r with alpha k·α: each part keeps α/r
                module, rank, layer_alpha = SplitQKVView(modules), len(modules) * rank, len(modules) * layer_alpha
            else:
                module = modules[0] if len(modules) == 1 else FusedLinearView(modules)
            targets.append(AdapterTarget(name, module, "unet", rank, layer_alpha))
        for group, rank in zip(bfl_keys.EMBEDDER_GROUPS, args.in_dims or ()):
            for bfl_path in group:
                diffusers_path = bfl_keys.TOP_LEVEL[bfl_path]
                if rank and _has_submodule(transformer, diffusers_path):
                    module = transformer.get_submodule(diffusers_path)
                    targets.append(AdapterTarget(bfl_keys.embedder_kohya_name(bfl_path), module, "unet", rank, alpha or float(rank)))
        return targets

    def text_encoders_to_train(self, comps: Components, cfg: Any) -> list[torch.nn.Module]:
        if cfg.network_train_unet_only:
            return []
        clip, t5 = comps.text_encoders
        return [clip, t5] if FluxNetworkArgs.from_config(cfg).train_t5xxl else [clip]

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

    def pipeline(self, comps: Components, sampler: str = "euler") -> Any:
        """A diffusers FluxPipeline over these very modules (an attached LoRA shows in its images). FLUX samples
        with the flow Euler scheduler whatever `sampler` says, as sd-scripts does."""
        from diffusers import FluxPipeline

        from lorakit.families.flux.loading import flow_scheduler

        clip, t5 = comps.text_encoders
        return FluxPipeline(
            scheduler=flow_scheduler(), vae=comps.vae, text_encoder=clip, tokenizer=comps.tokenizers[0],
            text_encoder_2=t5, tokenizer_2=comps.tokenizers[1], transformer=comps.denoiser,
        )

    # ----------------------------------------------------------------------------------------- metadata

    def metadata(self, cfg: Any) -> dict[str, str]:
        """sd-scripts' FLUX `ss_*` keys."""
        return {
            "ss_base_model_version": "flux1",
            "ss_v2": "False",
            "ss_model_type": str(cfg.model_type),
            "ss_apply_t5_attn_mask": str(bool(cfg.apply_t5_attn_mask)),
            "ss_weighting_scheme": str(cfg.weighting_scheme),
            "ss_logit_mean": str(cfg.logit_mean),
            "ss_logit_std": str(cfg.logit_std),
            "ss_mode_scale": str(cfg.mode_scale),
            "ss_guidance_scale": str(cfg.guidance_scale),
            "ss_timestep_sampling": str(cfg.timestep_sampling),
            "ss_sigmoid_scale": str(cfg.sigmoid_scale),
            "ss_model_prediction_type": str(cfg.model_prediction_type),
            "ss_discrete_flow_shift": str(cfg.discrete_flow_shift),
        }

    def modelspec_prediction_type(self, cfg: Any) -> str | None:
        """FLUX files carry no modelspec.prediction_type (sd-scripts omits it)."""
        return None

    def modelspec_architecture(self, cfg: Any) -> tuple[str, str, tuple[int, int]]:
        """FLUX.1-dev unless the loaded model has no guidance embedding (schnell)."""
        variant = getattr(self, "_variant", None) or "dev"
        return f"flux-1-{variant}", "https://github.com/black-forest-labs/flux", (1024, 1024)


def _has_submodule(root: torch.nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True
