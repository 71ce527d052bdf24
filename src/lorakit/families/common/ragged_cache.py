"""`--cache_text_encoder_outputs` for language-model encoders whose text tokens vary in number per caption.

Each distinct caption's real tokens are kept once, without padding; a batch is assembled by zero-padding its
rows to the longest, with the mask of the real tokens, exactly as a fresh encoding of the batch pads them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class RaggedCaptionCache:
    """Per-caption (tokens, width) rows of frozen encoder outputs."""

    def __init__(self) -> None:
        self._rows: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def outputs(self, captions: list[str], encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) tokens and (B, L) mask for `captions`; `encode` (run without gradients on the captions not
        seen before) returns padded tokens and their mask."""
        missing = sorted({caption for caption in captions if caption not in self._rows})
        if missing:
            with torch.no_grad():
                tokens, mask = encode(missing)
            for caption, row, keep in zip(missing, tokens, mask.bool()):
                self._rows[caption] = row[keep]
        return pad_rows([self._rows[caption] for caption in captions])


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths zero-padded to the longest, with the (bool) mask of the real tokens."""
    longest = max(row.shape[0] for row in rows)
    padded = torch.stack([torch.cat([row, row.new_zeros(longest - row.shape[0], row.shape[1])]) for row in rows])
    mask = torch.stack([torch.arange(longest, device=row.device) < row.shape[0] for row in rows])
    return padded, mask
