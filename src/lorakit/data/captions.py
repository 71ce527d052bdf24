"""Per-step caption processing in sd-scripts' order (inventory §3.6).

1. prefix / suffix            2. caption dropout (rate, every N epochs)      3. wildcards and caption lines
4. tag handling, only when shuffling, tag dropout, token warm-up or a keep_tokens_separator is in play:
   split (keep_tokens or keep_tokens_separator, optional fixed suffix) -> warm-up truncation -> shuffle ->
   tag dropout -> join with ", "
5. secondary_separator -> caption_separator      6. textual-inversion replacements

Everything is a pure function of the caption, the subset settings, a `CaptionContext` (epoch and step) and a
`random.Random`, so a given seed gives the same captions in any worker process. Where we differ from
sd-scripts on purpose (docs/datasets.md): a keep_tokens_separator never stays in the caption text, and the
prefix and suffix go around the chosen line of a multi-line caption rather than around the whole file.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from lorakit.data.specs import SubsetSpec

_WILDCARD = re.compile(r"\{([^{}]*)\}")
# Placeholders for escaped braces ({{ and }}), characters that never occur in captions.
_OPEN, _CLOSE = "\x00", "\x01"

Replacements = Mapping[str, "str | Sequence[str]"]


@dataclass(frozen=True)
class CaptionContext:
    """Where training is: `epoch` counts from 1 (0 before training), `step` is the optimizer step."""

    epoch: int = 0
    step: int = 0
    max_train_steps: int = 0


def add_prefix_suffix(caption: str, prefix: str | None, suffix: str | None) -> str:
    """`prefix caption suffix`, joined with spaces (so the prefix joins the first tag when shuffling)."""
    if prefix:
        caption = f"{prefix} {caption}"
    if suffix:
        caption = f"{caption} {suffix}"
    return caption


def split_tags(caption: str, separator: str) -> list[str]:
    """Tags of a caption: split on the separator, stripped, empty ones removed."""
    return [tag.strip() for tag in caption.split(separator) if tag.strip()]


def is_dropped(subset: SubsetSpec, context: CaptionContext, rng: random.Random) -> bool:
    """Caption dropout: with probability `caption_dropout_rate`, or in every N-th epoch (epochs from 1)."""
    dropped = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    every = subset.caption_dropout_every_n_epochs
    return dropped or (every > 0 and context.epoch > 0 and context.epoch % every == 0)


def caption_lines(caption: str) -> list[str]:
    """Non-empty, stripped lines of a caption (a caption file may hold several with enable_wildcard)."""
    return [line.strip() for line in caption.splitlines() if line.strip()]


def expand_wildcards(text: str, rng: random.Random) -> str:
    """Replace each `{a|b|c}` with one random option; `{{` and `}}` stand for literal braces."""
    text = text.replace("{{", _OPEN).replace("}}", _CLOSE)
    text = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), text)
    return text.replace(_OPEN, "{").replace(_CLOSE, "}")


def choose_line(caption: str, subset: SubsetSpec, rng: random.Random) -> str:
    """The caption line this step uses: a random one with enable_wildcard, else the first."""
    lines = caption_lines(caption) or [""]
    if not subset.enable_wildcard or len(lines) == 1:
        return lines[0]
    return rng.choice(lines)


def split_fixed_flexible(caption: str, subset: SubsetSpec) -> tuple[list[str], list[str], list[str]]:
    """(fixed head, flexible tags, fixed tail) by keep_tokens_separator (up to twice) or keep_tokens."""
    sep, marker = subset.caption_separator, subset.keep_tokens_separator
    if marker and marker in caption:
        head, flexible = caption.split(marker, 1)
        tail = ""
        if marker in flexible:
            flexible, tail = flexible.split(marker, 1)
        return split_tags(head, sep), split_tags(flexible, sep), split_tags(tail, sep)
    tags = split_tags(caption, sep)
    keep = max(0, subset.keep_tokens)
    return tags[:keep], tags[keep:], []


def warmup_step_limit(subset: SubsetSpec, max_train_steps: int) -> int:
    """token_warmup_step in steps: values below 1 are a fraction of max_train_steps."""
    step = subset.token_warmup_step
    return math.floor(step * max_train_steps) if 0 < step < 1 else int(step)


def warmup_tags(flexible: list[str], subset: SubsetSpec, context: CaptionContext) -> list[str]:
    """Token warm-up: before the limit step, keep only the first tags, growing linearly from the minimum."""
    limit = warmup_step_limit(subset, context.max_train_steps)
    if limit <= 0 or context.step >= limit:
        return flexible
    low = subset.token_warmup_min
    count = math.floor(context.step * (len(flexible) - low) / limit) + low
    return flexible[:max(0, count)]


def _uses_tag_processing(caption: str, subset: SubsetSpec) -> bool:
    marker = subset.keep_tokens_separator
    return bool(subset.shuffle_caption or subset.token_warmup_step > 0 or subset.caption_tag_dropout_rate > 0
                or (marker and marker in caption))


def process_tags(caption: str, subset: SubsetSpec, context: CaptionContext, rng: random.Random) -> str:
    """Split, warm up, shuffle, drop and re-join the tags (step 4)."""
    fixed, flexible, tail = split_fixed_flexible(caption, subset)
    flexible = warmup_tags(flexible, subset, context)
    if subset.shuffle_caption:
        rng.shuffle(flexible)
    rate = subset.caption_tag_dropout_rate
    if rate > 0:
        flexible = [tag for tag in flexible if rng.random() >= rate]
    return ", ".join(fixed + flexible + tail)


def apply_replacements(caption: str, replacements: Replacements | None, rng: random.Random) -> str:
    """Textual-inversion style replacements; an empty key replaces the whole caption, lists pick randomly."""
    for key, value in (replacements or {}).items():
        choice = value if isinstance(value, str) else rng.choice(list(value))
        caption = choice if key == "" else caption.replace(key, choice)
    return caption


def process_caption(caption: str, subset: SubsetSpec, rng: random.Random,
                    context: CaptionContext | None = None, replacements: Replacements | None = None) -> str:
    """The caption a training step sees for one image of `subset`."""
    context = context or CaptionContext()
    if is_dropped(subset, context, rng):
        return ""
    line = choose_line(caption, subset, rng)
    line = add_prefix_suffix(line, subset.caption_prefix, subset.caption_suffix)
    if subset.enable_wildcard:  # after the prefix and suffix, so wildcards in them are expanded too
        line = expand_wildcards(line, rng)
    if _uses_tag_processing(line, subset):
        line = process_tags(line, subset, context, rng)
    if subset.secondary_separator:
        line = line.replace(subset.secondary_separator, subset.caption_separator)
    return apply_replacements(line, replacements, rng)


def tag_counts(captions: list[str]) -> dict[str, int]:
    """How often each tag occurs (split on ",", lower-cased), as sd-scripts' `ss_tag_frequency` counts."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts
