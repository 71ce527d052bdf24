"""Pieces the families' tiny test models share (test fixtures only: production code never imports this)."""

from __future__ import annotations

from importlib import resources
from typing import Any

from transformers import T5Tokenizer

TINY_T5_MAX_LENGTH = 32
T5_TOKENIZER_ASSET = resources.files("lorakit") / "assets" / "t5_tokenizer"


def bundled_tiny_t5_tokenizer(max_length: int = 512) -> T5Tokenizer:
    """The small (1,000-piece) Unigram tokenizer lorakit ships for its tiny test models; not the real T5's."""
    return T5Tokenizer.from_pretrained(str(T5_TOKENIZER_ASSET), model_max_length=max_length, local_files_only=True)


def tiny_vae_config() -> dict[str, Any]:
    """Four levels (three downsamplings), so 64 px -> 8x8 latents like the real SD VAE."""
    return dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.18215,
    )
