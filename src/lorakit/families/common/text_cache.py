"""`--cache_text_encoder_outputs`: the outputs of frozen text encoders, computed once per distinct caption.

Captions cannot change between steps when caching is on (the config rules refuse shuffling, dropout and warm-up
with it), so a caption's outputs are the same every time it comes back; the cache keeps one row per caption and
stacks rows into batches. A family calls `outputs(captions, encode)` with a function that runs its frozen
encoders on a list of captions and returns batched tensors by name; an encoder that is being trained stays
outside the cache and runs every step (sd-scripts' "partial" caching for FLUX's CLIP-L).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["CaptionCache"]


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
