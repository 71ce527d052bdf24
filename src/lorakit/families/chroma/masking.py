"""Chroma's masking of T5 padding, as its reference trainer does it.

sd-scripts (`library/chroma_models.py`) and diffusers' ChromaPipeline keep each caption's tokens plus one padding
token and hide the rest. sd-scripts cuts the text to the longest kept length of the batch and runs each sample's
attention on its own kept tokens. lorakit does the same in two steps: `trim_text` cuts the batch to that length
(exact by itself when every caption keeps as many tokens, e.g. a batch of one), and, where lengths differ,
`KeyMask` hides the extra tokens of the shorter captions from every attention as keys. diffusers'
ChromaTransformer2DModel builds query×key masks from its `attention_mask` argument, whose fully masked rows give
NaN with boolean masks, and its checkpointed single blocks drop the mask; so the key mask is handed to each
attention layer by a forward pre-hook instead, for every forward and every checkpoint recomputation.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.families.common.bfl_packing import PATCH

KEEP_PADDING = 1  # padding tokens kept after each caption (sd-scripts' attn_padding, diffusers' `<=` lengths)


def kept_tokens(mask: torch.Tensor) -> torch.Tensor:
    """Per caption, how many T5 tokens the transformer sees: the caption and one padding token."""
    return (mask.sum(dim=1) + KEEP_PADDING).clamp(max=mask.shape[1])


def trim_text(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The T5 states cut to the batch's longest kept length, and which of the remaining tokens each caption keeps."""
    kept = kept_tokens(mask)
    length = int(kept.max())
    positions = torch.arange(length, device=mask.device)[None, :]
    return hidden[:, :length], positions < kept[:, None].to(mask.device)


class KeyMask:
    """The key mask of the current batch, read by the attention layers' pre-hooks (None: nothing to hide)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def set(self, keep_text: torch.Tensor, height: int, width: int) -> None:
        """Text tokens first, as the transformer joins them; every image token is kept."""
        if bool(keep_text.all()):
            self.mask = None
            return
        image = torch.ones(keep_text.shape[0], (height // PATCH) * (width // PATCH), dtype=torch.bool, device=keep_text.device)
        self.mask = torch.cat([keep_text, image], dim=1)[:, None, None, :]

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Hand the key mask to an attention call that got none, when its sequence is this batch's."""
        if self.mask is None or kwargs.get("attention_mask") is not None:
            return None
        hidden, context = kwargs.get("hidden_states"), kwargs.get("encoder_hidden_states")
        if hidden is None:
            return None
        length = hidden.shape[1] + (context.shape[1] if context is not None else 0)
        if length != self.mask.shape[-1] or hidden.shape[0] != self.mask.shape[0]:
            return None
        return args, {**kwargs, "attention_mask": self.mask.to(hidden.device)}


def install_key_mask(transformer: nn.Module) -> KeyMask:
    """One `KeyMask` for all attention layers of the transformer's blocks (installed once)."""
    existing = getattr(transformer, "_lorakit_key_mask", None)
    if existing is not None:
        return existing
    key_mask = KeyMask()
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for block in blocks:
            block.attn.register_forward_pre_hook(key_mask.hook, with_kwargs=True)
    object.__setattr__(transformer, "_lorakit_key_mask", key_mask)
    return key_mask
