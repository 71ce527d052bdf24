"""Z-Image's text conditioning, as diffusers' ZImagePipeline and musubi-tuner build it: the caption as one user
turn of Qwen3's chat template (with the assistant's opening, thinking enabled), the second-to-last hidden states
of its non-padding tokens."""

from __future__ import annotations

from typing import Any

import torch

MAX_TOKENS = 512  # the pipeline's max_sequence_length


def chat_text(tokenizer: Any, caption: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)


def encode_prompts(encoder: torch.nn.Module, tokenizer: Any, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, D) caption features zero-padded to the longest caption, and the (B, L) mask of the real tokens."""
    from lorakit.families.common.ragged_cache import pad_rows

    tokens = tokenizer([chat_text(tokenizer, c) for c in captions], padding=True, max_length=MAX_TOKENS,
                       truncation=True, return_tensors="pt")
    device = encoder.device
    mask = tokens.attention_mask.to(device).bool()
    hidden = encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    return pad_rows([row[keep] for row, keep in zip(hidden, mask)])
