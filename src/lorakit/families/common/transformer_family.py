"""Pieces the flow-matching transformer families share: latents normalised as (z − shift)·scale, and the
`--blocks_to_swap` installation (`common/block_swap.py`)."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from lorakit.data.text_cache import caches_text
from lorakit.families.base import Components
from lorakit.objectives.flow import ignored_option_warnings

log = logging.getLogger("lorakit")

def trains_t5(spec: Any) -> bool:
    """Whether `--network_args train_t5xxl=True` asks for LoRA modules on T5 (with the text encoders training)."""
    return bool(spec is not None and spec.train_text_encoder and spec.family_args is not None
                and spec.family_args.train_t5xxl)


def t5_family_problems(family_name: str, cfg: Any, spec: Any) -> list[str]:
    """The option rules every T5-conditioned flow family shares: a trained T5 cannot use cached outputs, and
    the SNR Huber schedule needs a DDPM schedule these families do not have."""
    problems = []
    if caches_text(cfg) and trains_t5(spec):
        problems.append("--network_args train_t5xxl=True cannot be used with --cache_text_encoder_outputs: "
                        "cached outputs carry no gradients to T5's LoRA modules")
    return problems + flow_family_problems(family_name, cfg)


def flow_family_problems(family_name: str, cfg: Any) -> list[str]:
    """The SNR Huber schedule needs a DDPM schedule, which no flow-matching family has."""
    if cfg.loss_type in ("huber", "smooth_l1") and cfg.huber_schedule == "snr":
        return [f"--huber_schedule snr is not available for --family {family_name}; use constant or exponential"]
    return []


def clip_length_warnings(family_name: str, cfg: Any) -> list[str]:
    """--max_token_length sizes CLIP-only prompts; a family without such prompts reads its own lengths."""
    return [f"--max_token_length is ignored for --family {family_name}"] if cfg.max_token_length is not None else []


def t5_family_warnings(family_name: str, cfg: Any) -> list[str]:
    """--max_token_length sizes CLIP-only prompts; a T5 family reads its own lengths (--t5xxl_max_token_length).
    The DDPM-only noise and loss options are accepted and ignored, as in sd-scripts: said once each."""
    return clip_length_warnings(family_name, cfg) + ignored_option_warnings(cfg, family_name)


class ShiftScaleLatents:
    """encode_images/decode_latents for VAEs whose config has both shift_factor and scaling_factor."""

    def encode_images(self, comps: Components, images: torch.Tensor) -> torch.Tensor:
        vae = comps.vae
        latents = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample()
        latents = torch.nan_to_num(latents, nan=0.0)
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def decode_latents(self, comps: Components, latents: torch.Tensor) -> torch.Tensor:
        vae = comps.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor).sample


class BlockSwapFamily:
    """`prepare_block_swap` for a family that defines `_check_block_swap(cfg, comps)` (its limits and plan)."""

    def swaps_blocks(self, cfg: Any) -> bool:
        return bool(getattr(cfg, "blocks_to_swap", None))

    def prepare_block_swap(self, comps: Components, cfg: Any, device: torch.device | str | None) -> None:
        """--blocks_to_swap: check and record the plan when `cfg` is given, and install it on `device` once
        (the swapped weights go to the CPU; every later forward of the transformer starts from that placement)."""
        if cfg is not None:
            self._check_block_swap(cfg, comps)
        if device is not None:
            ensure_block_swap(comps, device)


BLOCK_SWAP_PLAN = "block_swap_plan"  # comps.extras: [(list name, attribute of the denoiser, blocks to swap)]
BLOCK_SWAPPERS = "block_swappers"  # comps.extras: the installed BlockSwapper objects
SWAP_TRAINED = "block_swap_trained"  # comps.extras: the blocks' own weights train, and swap with them


def note_block_swap(comps: Components, plan: Sequence[tuple[str, str, int]]) -> None:
    """Record which block lists of the denoiser swap how many blocks; `ensure_block_swap` installs it."""
    if getattr(comps, "extras", None) is None:
        comps.extras = {}
    comps.extras[BLOCK_SWAP_PLAN] = [(name, attribute, int(n)) for name, attribute, n in plan]
    summary = ", ".join(f"{n} of {len(getattr(comps.denoiser, attribute))} {name}" for name, attribute, n in plan)
    if torch.cuda.is_available():
        log.info("--blocks_to_swap: %s kept on the CPU and streamed to the GPU", summary)
    else:
        log.info("--blocks_to_swap: %s swapped (it only saves GPU memory; on the CPU the moves are plain copies)", summary)


def plan_double_single_swap(comps: Components, swap: int, family_limit: str = "") -> None:
    """sd-scripts' --blocks_to_swap for a BFL-layout transformer (FLUX.1, Chroma, FLUX.2): N//2 double and
    2·(N − N//2) single blocks on the CPU, refused when fewer than two blocks of a kind would stay on the device
    (`family_limit` names the limit of the full-size model, e.g. "FLUX.1 allows 35")."""
    from lorakit.errors import ConfigError
    from lorakit.families.common.bfl_packing import max_blocks_to_swap, swapped_blocks

    config = comps.denoiser.config
    most = max_blocks_to_swap(config.num_layers, config.num_single_layers)
    if swap > most:
        limit = f"; {family_limit}" if family_limit else ""
        raise ConfigError([f"--blocks_to_swap {swap}: this model ({config.num_layers} double, {config.num_single_layers} "
                           f"single blocks) allows at most {most}{limit}"])
    double, single = swapped_blocks(swap)
    note_block_swap(comps, [("double blocks", "transformer_blocks", double), ("single blocks", "single_transformer_blocks", single)])


def ensure_block_swap(comps: Components, device: torch.device | str) -> list:
    """Install the recorded block swap on `device` once (a no-op without `--blocks_to_swap`). From then on the
    swapped weights live on the CPU, and every forward of the denoiser starts from the prepared placement."""
    swappers = comps.extras.get(BLOCK_SWAPPERS)
    plan = comps.extras.get(BLOCK_SWAP_PLAN)
    if swappers is not None or not plan:
        return swappers or []
    from lorakit.families.common.block_swap import install_block_swap

    lists: list[tuple[str, Sequence[nn.Module], int]] = [
        (name, list(getattr(comps.denoiser, attribute)), n) for name, attribute, n in plan
    ]
    swappers = install_block_swap(comps.denoiser, lists, device, include_trained=bool(comps.extras.get(SWAP_TRAINED)))
    comps.extras[BLOCK_SWAPPERS] = swappers
    return swappers
