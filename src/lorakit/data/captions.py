"""Per-step caption processing, in sd-scripts' order (inventory §3.6): prefix/suffix, then tag shuffling.

Pure functions of the caption, the subset settings and a random generator, so a given seed gives the same
captions in any worker process.
"""

from __future__ import annotations

import random

from lorakit.data.specs import SubsetSpec


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


def shuffle_tags(caption: str, separator: str, keep_tokens: int, rng: random.Random) -> str:
    """Shuffle all tags but the first `keep_tokens`, and join them with ", " as sd-scripts does."""
    tags = split_tags(caption, separator)
    fixed, flexible = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(flexible)
    return ", ".join(fixed + flexible)


def process_caption(caption: str, subset: SubsetSpec, rng: random.Random) -> str:
    """The caption a training step sees for one image of `subset`."""
    caption = add_prefix_suffix(caption, subset.caption_prefix, subset.caption_suffix)
    if subset.shuffle_caption:
        caption = shuffle_tags(caption, subset.caption_separator, subset.keep_tokens, rng)
    return caption


def tag_counts(captions: list[str]) -> dict[str, int]:
    """How often each tag occurs (split on ",", lower-cased), as sd-scripts' `ss_tag_frequency` counts."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts
