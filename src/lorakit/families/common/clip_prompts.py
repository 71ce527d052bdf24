"""Long and weighted captions for CLIP text encoders: `--max_token_length` and `--weighted_captions`.

sd-scripts' SD 1.x/2.x and SDXL behaviour:
- `--max_token_length 150|225` tokenizes a caption to 152 or 227 ids (BOS + 150/225 + EOS/padding) and cuts
  them into 2 or 3 windows of 77 ids, each `BOS + 75 ids + last id of the whole sequence`. With an end-token
  padding (OpenAI CLIP) the windows are left as they are; with a separate pad token (OpenCLIP: SD 2.x, SDXL's
  second encoder) a window whose 76th id is a caption token ends in EOS, and a window that starts with padding
  gets EOS in its second place. Each window is encoded on its own; the hidden states are joined back into
  75·n + 2 positions: the first window's BOS, each window's 75 middle states, and the last window's last state.
  SDXL's pooled embedding is the first window's.
- `--weighted_captions` reads A1111's attention syntax: `(words)` ×1.1, `[words]` ÷1.1, `(words:1.3)` ×1.3,
  nested brackets multiply, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters and an unclosed bracket
  weights everything after it. Each token's hidden state is multiplied by its weight (BOS, EOS and padding
  keep 1), after the windows are joined.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

WINDOW = 77  # ids a CLIP text encoder reads at once: BOS + 75 + EOS
BODY = WINDOW - 2
LONG_LENGTHS = (75, 150, 225)  # --max_token_length values sd-scripts accepts (None is 75)
BRACKET_UP = 1.1

# One piece of an attention-syntax caption: an escape, a bracket, an explicit weight closing a round bracket, or
# a run of plain text (":" alone is plain text).
_PIECE = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:([+-]?[.\d]+)\)|\)|\]|[^\\()\[\]:]+|:")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """The caption as (text, weight) runs; neighbouring runs of equal weight are joined."""
    runs: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _PIECE.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(runs))
        elif piece == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            scale(round_open.pop(), BRACKET_UP)
        elif piece == "]" and square_open:
            scale(square_open.pop(), 1 / BRACKET_UP)
        else:
            runs.append([piece, 1.0])
    for start in round_open:
        scale(start, BRACKET_UP)
    for start in square_open:
        scale(start, 1 / BRACKET_UP)
    joined: list[list[Any]] = []
    for run in runs or [["", 1.0]]:
        if joined and joined[-1][1] == run[1]:
            joined[-1][0] += run[0]
        else:
            joined.append(list(run))
    return [(piece, weight) for piece, weight in joined]


def _weighted_ids(tokenizer: Any, text: str, length: int) -> tuple[list[int], list[float]]:
    """`length` ids (BOS, at most length - 2 caption tokens, EOS, padding) and one weight per id."""
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_attention(text):
        tokens = tokenizer(piece).input_ids[1:-1]
        ids += tokens
        weights += [weight] * len(tokens)
        if len(ids) > length - 2:
            break
    ids, weights = ids[: length - 2], weights[: length - 2]
    padding = length - 2 - len(ids)
    return ([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding,
            [1.0, *weights] + [1.0] * (padding + 1))


def _windows(tokenizer: Any, ids: list[int]) -> list[list[int]]:
    """Cut a long id sequence into windows of 77 ids (see the module docstring)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    windows = []
    for start in range(1, len(ids) - WINDOW + 2, BODY):
        window = [ids[0], *ids[start: start + BODY], ids[-1]]
        if pad != eos:
            if window[-2] not in (eos, pad):
                window[-1] = eos
            if window[1] == pad:
                window[1] = eos
        windows.append(window)
    return windows


def _weight_windows(weights: list[float], count: int) -> list[list[float]]:
    """The weights of each window's 75 caption positions (BOS and the last position keep 1)."""
    return [[1.0, *weights[1 + i * BODY: 1 + (i + 1) * BODY], 1.0] for i in range(count)]


@dataclass(frozen=True)
class ClipPrompts:
    """How captions become CLIP ids: `max_token_length` (None = 75) and whether they carry attention weights."""

    max_token_length: int | None = None
    weighted: bool = False

    @classmethod
    def from_options(cls, cfg: Any) -> "ClipPrompts":
        return cls(getattr(cfg, "max_token_length", None), bool(getattr(cfg, "weighted_captions", False)))

    @property
    def windows(self) -> int:
        return 1 if self.max_token_length is None else self.max_token_length // BODY

    def tokenize(self, tokenizer: Any, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Ids (B, windows, 77) and, for weighted captions, their weights (B, windows, 77)."""
        length = WINDOW if self.max_token_length is None else self.max_token_length + 2
        ids_rows, weight_rows = [], []
        for caption in captions:
            if self.weighted:
                ids, weights = _weighted_ids(tokenizer, caption, length)
            else:
                ids = tokenizer(caption, padding="max_length", truncation=True, max_length=length).input_ids
                weights = [1.0] * length
            if length > WINDOW:
                ids_rows.append(_windows(tokenizer, ids))
                weight_rows.append(_weight_windows(weights, self.windows))
            else:
                ids_rows.append([ids])
                weight_rows.append([weights])
        return torch.tensor(ids_rows), torch.tensor(weight_rows) if self.weighted else None

    def join(self, hidden: torch.Tensor, batch: int) -> torch.Tensor:
        """Hidden states of every window (B·n, 77, width) as one sequence per caption (B, 75·n + 2, width)."""
        hidden = hidden.reshape(batch, -1, hidden.shape[-1])
        if self.windows == 1:
            return hidden
        parts = [hidden[:, :1]]
        parts += [hidden[:, start: start + BODY] for start in range(1, self.windows * WINDOW, WINDOW)]
        parts.append(hidden[:, -1:])
        return torch.cat(parts, dim=1)

    def weigh(self, hidden: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Joined hidden states multiplied by their tokens' weights (unchanged without weights)."""
        if weights is None:
            return hidden
        weights = weights.to(device=hidden.device, dtype=hidden.dtype)
        if self.windows == 1:
            return hidden * weights[:, 0].unsqueeze(-1)
        factors = torch.ones(hidden.shape[:2], device=hidden.device, dtype=hidden.dtype)
        for i in range(self.windows):
            factors[:, 1 + i * BODY: 1 + (i + 1) * BODY] = weights[:, i, 1:-1]
        return hidden * factors.unsqueeze(-1)


def encoder_ids(ids: torch.Tensor) -> torch.Tensor:
    """(B, windows, 77) ids as the (B·windows, 77) batch an encoder reads."""
    return ids.reshape(-1, WINDOW)
