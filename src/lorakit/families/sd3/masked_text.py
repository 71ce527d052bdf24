"""SD3's prompt inputs under `--apply_lg_attn_mask` / `--apply_t5_attn_mask` for `lorakit sample`
(sd3_minimal_inference.py's options): the masked encoders do not attend to their padding, and their padded outputs
are zeroed (as training conditions with them, `conditioning.py`); the rest is what diffusers' SD3 pipeline encodes
(CLIP-L/G's penultimate states, T5 at 256 tokens)."""

from __future__ import annotations

from typing import Any

import torch

from lorakit.families.sd3.conditioning import assemble_conditioning, clip_outputs
from lorakit.transfer import to_device

T5_LENGTH = 256  # diffusers' StableDiffusion3Pipeline's default and sd3_minimal_inference.py's --t5xxl_token_length


@torch.no_grad()
def masked_prompt_inputs(comps: Any, prompt: str, negative: str, lg_mask: bool, t5_mask: bool) -> dict[str, Any]:
    """`prompt_embeds`, `pooled_prompt_embeds` and the negative ones (the pipeline guides with both)."""
    inputs: dict[str, Any] = {}
    for prefix, text in (("", prompt), ("negative_", negative)):
        conditioning = _encode(comps, text, lg_mask, t5_mask)
        inputs[f"{prefix}prompt_embeds"] = conditioning["context"]
        inputs[f"{prefix}pooled_prompt_embeds"] = conditioning["pooled"]
    return inputs


def _encode(comps: Any, text: str, lg_mask: bool, t5_mask: bool) -> dict[str, torch.Tensor]:
    (clip_l, clip_g, t5), (tok_l, tok_g, tok_t5) = comps.text_encoders, comps.tokenizers
    l_hidden, l_pooled, l_keep = clip_outputs(clip_l, tok_l, [text], lg_mask)
    g_hidden, g_pooled, g_keep = clip_outputs(clip_g, tok_g, [text], lg_mask)
    tokens = tok_t5([text], padding="max_length", max_length=T5_LENGTH, truncation=True, return_tensors="pt")
    t5_keep = to_device(tokens.attention_mask, t5.device)
    t5_hidden = t5(to_device(tokens.input_ids, t5.device), attention_mask=t5_keep if t5_mask else None).last_hidden_state
    parts = {"l": _zero_padding(l_hidden, l_keep, lg_mask), "g": _zero_padding(g_hidden, g_keep, lg_mask),
             "t5": _zero_padding(t5_hidden, t5_keep, t5_mask), "l_pooled": l_pooled, "g_pooled": g_pooled}
    return assemble_conditioning(parts, (0.0, 0.0, 0.0), training=False)


def _zero_padding(hidden: torch.Tensor, keep: torch.Tensor, masked: bool) -> torch.Tensor:
    return hidden * keep.to(device=hidden.device, dtype=hidden.dtype)[..., None] if masked else hidden
