"""The cleanup rules of sd-scripts' `finetune/clean_captions_and_tags.py`, as functions over tag lists.

Tags (text separated by ", "):

1. underscores become spaces, except in the kaomoji `^_^`;
2. a DeepDanbooru rating (", rating..." and everything after it) is cut off;
3. when the tags mention several people ("girls" or "boys" anywhere), per-person attributes that occur more
   than once are dropped group by group: hair lengths, hair cuts, eye colours, sleeves, hairstyles; then hair
   colours (`<word> hair`) when there is more than one, keeping the hair length;
4. a one-word tag (or "hair ornament") is dropped when a longer tag ends in it ("shirt" beside "white shirt").

Captions: a fixed list of phrase replacements (e.g. "anime girl" -> "girl", "woman" -> "girl"), applied in
order, each until the text stops changing. Like sd-scripts, they replace text anywhere, inside words too.
"""

from __future__ import annotations

import re

_WORD = r"[\w\-]+"
_HAIR_LENGTH = re.compile(r"(?:long|short|medium) hair")
# Groups of per-person attributes: with several people, a group with more than one tag is ambiguous.
_PER_PERSON_GROUPS = [
    _HAIR_LENGTH,
    re.compile(r"(?:bob|hime) cut"),
    re.compile(rf"{_WORD} eyes"),
    re.compile(rf"{_WORD} sleeves|sleeveless"),
    re.compile(rf"ponytail|braid|ahoge|twintails|{_WORD} bun|single hair bun|single side bun|two side up|two tails"
               rf"|{_WORD} braid|sidelocks"),
]
_HAIR = re.compile(rf"{_WORD} hair")
_GENERIC = re.compile(rf"{_WORD}|hair ornament")
_KAOMOJI = "^_^"


def _without_group(tags: list[str], pattern: re.Pattern, keep: re.Pattern | None = None) -> list[str]:
    """Drop every tag matching `pattern` (except those matching `keep`) when more than one does."""
    matching = [t for t in tags if pattern.fullmatch(t) and not (keep and keep.fullmatch(t))]
    return [t for t in tags if t not in matching] if len(matching) > 1 else tags


def _without_generic(tags: list[str]) -> list[str]:
    """Drop a one-word tag W when another tag is words followed by W ("shirt" next to "white shirt")."""
    present = set(tags)
    redundant = {
        word for word in present if _GENERIC.fullmatch(word)
        and any(re.fullmatch(rf"(?:\w+ )+{re.escape(word)}", other) for other in present)
    }
    return [t for t in tags if t not in redundant]


def clean_tags(text: str) -> str:
    """Tags cleaned by the rules in the module docstring, joined with ", "."""
    text = _KAOMOJI.join(part.replace("_", " ") for part in text.split(_KAOMOJI))
    rating = text.find(", rating")
    if rating >= 0:
        text = text[:rating]
    tags = [tag for tag in text.split(", ") if tag]
    if "girls" in text or "boys" in text:
        for group in _PER_PERSON_GROUPS:
            tags = _without_group(tags, group)
        tags = _without_group(tags, _HAIR, keep=_HAIR_LENGTH)
    return ", ".join(_without_generic(tags))


# Replacements for BLIP/GIT-style captions of anime pictures, applied in this order.
CAPTION_REPLACEMENTS = (
    ("anime anime", "anime"), ("young ", ""),
    ("anime girl", "girl"), ("cartoon female", "girl"), ("cartoon lady", "girl"), ("cartoon character", "girl"),
    ("cartoon woman", "girl"), ("cartoon women", "girls"), ("cartoon girl", "girl"),
    ("anime female", "girl"), ("anime lady", "girl"), ("anime character", "girl"), ("anime woman", "girl"),
    ("anime women", "girls"),
    ("lady", "girl"), ("female", "girl"), ("woman", "girl"), ("women", "girls"), ("people", "girls"), ("person", "girl"),
    ("a cartoon figure", "a figure"), ("a cartoon image", "an image"), ("a cartoon picture", "a picture"),
    ("an anime cartoon image", "an image"), ("a cartoon anime drawing", "a drawing"), ("a cartoon drawing", "a drawing"),
    ("girl girl", "girl"),
)


def clean_caption(caption: str) -> str:
    """The caption with CAPTION_REPLACEMENTS applied in order, each repeated until nothing changes."""
    for old, new in CAPTION_REPLACEMENTS:
        while old in caption:
            caption = caption.replace(old, new)
    return caption
