"""Rules of text-encoder caching that several families share."""

from __future__ import annotations

from typing import Any

from lorakit.data.text_cache import caches_text


def whole_cache_problems(cfg: Any) -> list[str]:
    """A family whose every text encoder is cached (SD, SDXL) trains no text-encoder LoRA with caching: cached
    outputs carry no gradients, so sd-scripts requires --network_train_unet_only (SDXL's trainer asserts it)."""
    if caches_text(cfg) and not getattr(cfg, "network_train_unet_only", False):
        flag = "--cache_text_encoder_outputs_to_disk" if getattr(cfg, "cache_text_encoder_outputs_to_disk", False) \
            else "--cache_text_encoder_outputs"
        return [f"{flag} needs --network_train_unet_only: cached outputs cannot carry gradients to text-encoder "
                "LoRA modules"]
    return []
