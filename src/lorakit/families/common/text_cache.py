"""`--cache_text_encoder_outputs`: the outputs of frozen text encoders, computed once per distinct caption.

Captions cannot change between steps when caching is on (the config rules refuse shuffling, dropout and warm-up
with it), so a caption's outputs are the same every time it comes back; the cache keeps one row per caption and
stacks rows into batches. A family calls `outputs(captions, encode)` with a function that runs its frozen
encoders on a list of captions and returns batched tensors by name; an encoder that is being trained stays
outside the cache and runs every step (sd-scripts' "partial" caching for FLUX's CLIP-L).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lorakit.errors import ConfigError

__all__ = ["CaptionCache", "caches_text", "whole_caption_cache"]


def caches_text(cfg: Any) -> bool:
    """Whether the run asked for cached text-encoder outputs (`_to_disk` implies caching)."""
    return bool(getattr(cfg, "cache_text_encoder_outputs", False) or getattr(cfg, "cache_text_encoder_outputs_to_disk", False))


class CaptionCache:
    """Per-caption rows of named text-encoder outputs."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def outputs(self, captions: list[str], encode: Callable[[list[str]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The batched outputs for `captions`, encoding (without gradients) only captions not seen before."""
        missing = sorted({caption for caption in captions if caption not in self._rows})
        if missing:
            with torch.no_grad():
                fresh = encode(missing)
            for index, caption in enumerate(missing):
                self._rows[caption] = {name: value[index] for name, value in fresh.items()}
        names = self._rows[captions[0]].keys()
        return {name: torch.stack([self._rows[caption][name] for caption in captions]) for name in names}


def whole_caption_cache(cfg: Any) -> CaptionCache | None:
    """The cache of a family whose every text encoder is cached (SD, SDXL), or None without caching.

    Cached outputs carry no gradients, so caching needs `--network_train_unet_only`, as in sd-scripts.
    """
    if not caches_text(cfg):
        return None
    trains = getattr(cfg, "trains_text_encoder", not getattr(cfg, "network_train_unet_only", False))
    if trains:
        if getattr(cfg, "trains_model_weights", False):
            raise ConfigError(["--cache_text_encoder_outputs cannot be used while a text encoder trains: cached "
                               "outputs carry no gradients (leave out --train_text_encoder, or the cache)"])
        raise ConfigError(["--cache_text_encoder_outputs needs --network_train_unet_only: cached outputs cannot carry "
                           "gradients to text-encoder LoRA modules"])
    return CaptionCache()
