"""FLUX.1's prompt inputs under `--apply_t5_attn_mask` for `lorakit sample` (flux_minimal_inference.py's option).

sd-scripts encodes the prompt with T5 not attending to its padding and hides the padded tokens from every attention
of the transformer. The text tokens' positions are all zero (`txt_ids`), so a token hidden from every attention is a
token left out: the prompt's T5 states are cut to its real tokens, which diffusers' pipeline takes as they are (its
text positions follow the embeddings' length).
"""

from __future__ import annotations

from typing import Any

import torch

from lorakit.transfer import to_device

T5_LENGTH = 512  # diffusers' FluxPipeline's default, the length the unmasked images are encoded with


@torch.no_grad()
def masked_prompt_inputs(comps: Any, prompt: str, negative: str) -> dict[str, Any]:
    """`prompt_embeds`, `pooled_prompt_embeds` and the negative ones (used where the pipeline guides with true CFG)."""
    inputs: dict[str, Any] = {}
    for prefix, text in (("", prompt), ("negative_", negative)):
        pooled, hidden = _encode(comps, text)
        inputs[f"{prefix}prompt_embeds"], inputs[f"{prefix}pooled_prompt_embeds"] = hidden, pooled
    return inputs


def _encode(comps: Any, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    (clip, t5), (clip_tok, t5_tok) = comps.text_encoders, comps.tokenizers
    clip_ids = clip_tok([text], padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
    pooled = clip(to_device(clip_ids, clip.device), output_hidden_states=False).pooler_output
    tokens = t5_tok([text], padding="max_length", max_length=T5_LENGTH, truncation=True, return_tensors="pt")
    mask = to_device(tokens.attention_mask, t5.device)
    hidden = t5(to_device(tokens.input_ids, t5.device), attention_mask=mask).last_hidden_state
    return pooled, hidden[:, : int(tokens.attention_mask.sum())]
