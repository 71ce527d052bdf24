"""Prompt weighting for sample images: `(word)` ×1.1, `[word]` ÷1.1, `(word:1.3)`, and prompts beyond 75 tokens.

The syntax is the one A1111 and sd-scripts' long-prompt-weighting pipeline read: brackets nest and multiply,
`\\(` writes a literal bracket, unclosed brackets apply to the rest of the prompt. Encoding splits the tokens
into 75-token chunks, encodes each as its own 77-token CLIP sequence (BOS + 75 + EOS/padding) and joins them,
then scales each token's embedding by its weight and rescales the whole so its mean is unchanged (so weights
shift emphasis rather than overall magnitude).
"""

from __future__ import annotations

import re
from typing import Any

import torch

CHUNK_TOKENS = 75
MAX_CHUNKS = 3  # 225 tokens, the longest --max_token_length

_ATTENTION = re.compile(
    r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:"
)
_UP, _DOWN = 1.1, 1 / 1.1


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs; neighbouring runs of equal weight are merged."""
    runs: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(runs))
        elif token == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            scale_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale_from(round_open.pop(), _UP)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), _DOWN)
        else:
            runs.append([token, 1.0])
    for start in round_open:
        scale_from(start, _UP)
    for start in square_open:
        scale_from(start, _DOWN)
    merged: list[tuple[str, float]] = []
    for piece, weight in runs:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged or [("", 1.0)]


def plain_text(text: str) -> str:
    """The prompt without weighting syntax (for pipelines that take plain text)."""
    return "".join(piece for piece, _ in parse_prompt_weights(text))


def weighted_token_ids(tokenizer: Any, text: str, max_chunks: int = MAX_CHUNKS) -> tuple[list[int], list[float]]:
    """Token ids (without BOS/EOS) and one weight per token, cut at `max_chunks` × 75 tokens."""
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_prompt_weights(text):
        piece_ids = tokenizer(piece, add_special_tokens=False).input_ids if piece.strip() else []
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    limit = max_chunks * CHUNK_TOKENS
    return ids[:limit], weights[:limit]


def _chunked(tokenizer: Any, ids: list[int], weights: list[float], chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunks, 77) ids with BOS/EOS/padding, and the matching weights (1.0 on special tokens)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows, row_weights = [], []
    for c in range(chunks):
        part = ids[c * CHUNK_TOKENS:(c + 1) * CHUNK_TOKENS]
        part_w = weights[c * CHUNK_TOKENS:(c + 1) * CHUNK_TOKENS]
        filler = CHUNK_TOKENS - len(part)
        rows.append([bos] + part + [eos] + [pad] * filler)
        row_weights.append([1.0] + part_w + [1.0] + [1.0] * filler)
    return torch.tensor(rows), torch.tensor(row_weights)


def _hidden_states(encoder: Any, ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    if not clip_skip or clip_skip <= 1:
        return encoder(ids).last_hidden_state
    states = encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    owner = getattr(encoder, "text_model", encoder)
    return owner.final_layer_norm(states)


@torch.no_grad()
def encode_weighted_prompts(encoder: Any, tokenizer: Any, prompts: list[str], clip_skip: int | None = None,
                            max_chunks: int = MAX_CHUNKS) -> torch.Tensor:
    """(B, 77·k, D) embeddings of weighted prompts; every prompt gets the same k (the longest one's)."""
    tokenized = [weighted_token_ids(tokenizer, p, max_chunks) for p in prompts]
    chunks = max(1, max(-(-len(ids) // CHUNK_TOKENS) for ids, _ in tokenized))
    outputs = []
    for ids, weights in tokenized:
        chunk_ids, chunk_weights = _chunked(tokenizer, ids, weights, chunks)
        hidden = _hidden_states(encoder, chunk_ids.to(encoder.device), clip_skip)  # (k, 77, D)
        hidden = hidden.reshape(1, -1, hidden.shape[-1]).float()
        outputs.append(_weighted(hidden, chunk_weights.reshape(1, -1, 1).to(hidden.device)))
    return torch.cat(outputs).to(encoder.dtype)


def _weighted(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token's embedding by its weight, then restore the overall mean (sd-scripts' rule). Unweighted
    prompts are returned as they are, and a weighted mean of exactly 0 skips the restore instead of dividing
    0 by 0 (which made whole images NaN, i.e. black)."""
    if bool((weights == 1).all()):
        return hidden
    before = hidden.mean(dim=(-2, -1), keepdim=True)
    weighted = hidden * weights
    after = weighted.mean(dim=(-2, -1), keepdim=True)
    return torch.where(after == 0, weighted, weighted * (before / after))


# ---------------------------------------------------------------------------------------------------------
# whole pipelines' prompt embeddings (`ModelFamily.prompt_embedding_kwargs`)
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def single_clip_embeddings(pipe: Any, prompts: list[str], negatives: list[str], max_chunks: int,
                           clip_skip: int | None) -> dict[str, torch.Tensor]:
    """`prompt_embeds` / `negative_prompt_embeds` of a one-CLIP pipeline, weighted and up to `max_chunks` × 75
    tokens (prompts and negatives padded to the same number of chunks, as classifier-free guidance needs)."""
    texts = [_with_embedding_tokens(pipe, t, pipe.tokenizer) for t in [*prompts, *negatives]]
    embeds = encode_weighted_prompts(pipe.text_encoder, pipe.tokenizer, texts, clip_skip, max(1, max_chunks))
    return {"prompt_embeds": embeds[: len(prompts)], "negative_prompt_embeds": embeds[len(prompts):]}


@torch.no_grad()
def dual_clip_embeddings(pipe: Any, prompts: list[str], negatives: list[str], max_chunks: int) -> dict[str, torch.Tensor]:
    """SDXL-style conditioning: each encoder's penultimate layer (weighted, chunked) joined along the width, and
    the second encoder's projected pooled output of the first chunk (the unweighted prompt's)."""
    texts = [*prompts, *negatives]
    chunks = max(1, min(max(1, max_chunks), max(-(-len(weighted_token_ids(pipe.tokenizer, t, max_chunks)[0]) // CHUNK_TOKENS) for t in texts)))
    hidden = [_penultimate_weighted(pipe, encoder, tokenizer, texts, chunks)
              for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))]
    joined = torch.cat([hidden[0], hidden[1].to(hidden[0].dtype)], dim=-1)
    pooled = _pooled(pipe, pipe.text_encoder_2, pipe.tokenizer_2, texts)
    n = len(prompts)
    return {"prompt_embeds": joined[:n], "negative_prompt_embeds": joined[n:],
            "pooled_prompt_embeds": pooled[:n], "negative_pooled_prompt_embeds": pooled[n:]}


def _penultimate_weighted(pipe: Any, encoder: Any, tokenizer: Any, texts: list[str], chunks: int) -> torch.Tensor:
    outputs = []
    for text in texts:
        ids, weights = weighted_token_ids(tokenizer, _with_embedding_tokens(pipe, text, tokenizer), chunks)
        chunk_ids, chunk_weights = _chunked(tokenizer, ids, weights, chunks)
        hidden = encoder(chunk_ids.to(encoder.device), output_hidden_states=True).hidden_states[-2]
        hidden = hidden.reshape(1, -1, hidden.shape[-1]).float()
        outputs.append(_weighted(hidden, chunk_weights.reshape(1, -1, 1).to(hidden.device)))
    return torch.cat(outputs).to(encoder.dtype)


def _pooled(pipe: Any, encoder: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    ids = tokenizer([plain_text(_with_embedding_tokens(pipe, t, tokenizer)) for t in texts], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return encoder(ids.to(encoder.device), output_hidden_states=True)[0]


def _with_embedding_tokens(pipe: Any, text: str, tokenizer: Any) -> str:
    """A multi-vector embedding's token spelled out as its vectors' tokens (`tok tok_1 tok_2`), as diffusers' own
    prompt encoding does (`maybe_convert_prompt`); text without such tokens is unchanged."""
    convert = getattr(pipe, "maybe_convert_prompt", None)
    return convert(text, tokenizer) if convert is not None else text


def add_embedding(pipe: Any, state: dict[str, torch.Tensor], token: str, source: str, keys: tuple[str, ...],
                  text_encoder: Any = None, tokenizer: Any = None, *, single_tensor: bool = False) -> None:
    """One encoder's vectors of a textual-inversion file (the first of `keys` it holds; with `single_tensor` also
    a file's only tensor, diffusers' layout) added through diffusers' `load_textual_inversion`, which appends the
    token rows to this tokenizer and encoder."""
    from lorakit.errors import CheckpointError

    vectors = next((state[k] for k in keys if k in state), None)
    if vectors is None and single_tensor and len(state) == 1:
        vectors = next(iter(state.values()))
    if vectors is None:
        raise CheckpointError(f"{source}: no embedding vectors under {' or '.join(keys)} (keys: {', '.join(list(state)[:5])})")
    encoder = text_encoder if text_encoder is not None else pipe.text_encoder
    width = encoder.get_input_embeddings().weight.shape[1]
    if vectors.shape[-1] != width:
        raise CheckpointError(f"{source}: the embedding's vectors are {vectors.shape[-1]} wide, the text encoder's {width}: "
                              "is it for another model?")
    extra = {"text_encoder": text_encoder, "tokenizer": tokenizer} if text_encoder is not None else {}
    pipe.load_textual_inversion(vectors.reshape(-1, width).to(encoder.dtype), token=token, **extra)
