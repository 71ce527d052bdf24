"""Which tags a WD14-style tagger's probabilities become, and in what order (sd-scripts
`finetune/tag_images_by_wd14_tagger.py`, inventory §1.3).

Pure functions over label lists and probability vectors, so every rule is testable without a model:

* label names are rewritten once, before tagging: `--character_tag_expand` (`name_(series)` -> `name, series`),
  then `--remove_underscore` (names of 3 characters or fewer keep theirs, so kaomoji like `^_^` survive), then
  `--tag_replacement` (whole-tag matches; `\\,` and `\\;` escape the separators);
* a tag is kept when its probability reaches its category's threshold and it is not in `--undesired_tags`;
  rating (and quality) labels are not thresholded: the most probable one is used with `--use_rating_tags` /
  `--use_quality_tags`, in front (or last with the `*_as_last_tag` options); in front, rating comes before
  quality;
* order: character tags first with `--character_tags_first`, then the others in the model's label order
  (selected_tags.csv models) or by probability (tag_mapping.json models), then `--always_first_tags` moved to
  the front in the order given.

Where this differs from sd-scripts (docs/datasets.md): `--tag_replacement` replaces tags (sd-scripts' loop
rebinds its list and replaces nothing); `--always_first_tags` keep the order given (sd-scripts reverses it);
character tags keep the model's order with `--character_tags_first` (sd-scripts reverses them).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from lorakit.errors import DataError

# Danbooru's category numbers, as they appear in selected_tags.csv; tag_mapping.json names them instead.
CATEGORY_NUMBERS = {"0": "general", "1": "artist", "3": "copyright", "4": "character", "5": "meta", "9": "rating"}
CATEGORIES = ("general", "character", "rating", "copyright", "artist", "meta", "model", "quality")
THRESHOLDED = ("general", "character", "copyright", "artist", "meta", "model")


@dataclass(frozen=True)
class Label:
    """One output of the tagger: the tag text and its category (one of CATEGORIES).

    An expanded character label (`name, series`) writes two tags: `parts` holds them.
    """

    name: str
    category: str
    parts: tuple[str, ...] = ()

    @property
    def tags(self) -> tuple[str, ...]:
        return self.parts or (self.name,)


@dataclass(frozen=True)
class TagOptions:
    """The tag-selection options of `lorakit tag`, with sd-scripts' names and defaults."""

    thresholds: dict[str, float] = field(default_factory=lambda: {c: 0.35 for c in THRESHOLDED})
    separator: str = ", "
    undesired_tags: frozenset[str] = frozenset()
    always_first_tags: tuple[str, ...] = ()
    character_tags_first: bool = False
    use_rating_tags: bool = False
    use_rating_tags_as_last_tag: bool = False
    use_quality_tags: bool = False
    use_quality_tags_as_last_tag: bool = False


def category_of(value: str) -> str | None:
    """A category from a CSV number ("4") or a name ("Character"); None when unknown."""
    value = value.strip()
    if value in CATEGORY_NUMBERS:
        return CATEGORY_NUMBERS[value]
    return value.lower() if value.lower() in CATEGORIES else None


def read_selected_tags_csv(path: Path) -> list[Label]:
    """Labels of a `selected_tags.csv` (columns tag_id,name,category,count), one per model output, in order.

    Rows of categories outside CATEGORIES are kept as unusable labels (category "unknown") so the rows still line
    up with the model's outputs.
    """
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"tag list {path} cannot be read: {err}") from None
    if not rows or [h.strip() for h in rows[0][:3]] != ["tag_id", "name", "category"]:
        raise DataError(f"tag list {path} must start with the header tag_id,name,category,count "
                        f"(found {','.join(rows[0]) if rows else 'an empty file'})")
    labels = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) < 3:
            raise DataError(f"tag list {path}, line {number}: expected tag_id,name,category,count")
        labels.append(Label(row[1], category_of(row[2]) or "unknown"))
    return labels


def read_tag_mapping_json(path: Path) -> list[Label | None]:
    """Labels of a `tag_mapping.json` ({tag_id: {"tag", "category"}}), indexed by tag id; gaps are None."""
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
        entries = {int(key): (str(v["tag"]), str(v["category"])) for key, v in mapping.items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"tag mapping {path} must be a JSON object {{id: {{tag, category}}}} ({err})") from None
    labels: list[Label | None] = [None] * (max(entries, default=-1) + 1)
    for index, (name, category) in entries.items():
        labels[index] = Label(name, category_of(category) or "unknown")
    return labels


# ---------------------------------------------------------------------------------------------------------
# label rewriting
# ---------------------------------------------------------------------------------------------------------


def _split_unescaped(text: str, separator: str) -> list[str]:
    """Split on `separator` where it is not preceded by a backslash; `\\,` and `\\;` become `,` and `;`."""
    parts, current, index = [], [], 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text) and text[index + 1] in ",;":
            current.append("\\" + text[index + 1])  # keep escaped until the last split is done
            index += 2
            continue
        if char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    parts.append("".join(current))
    return parts


def parse_tag_replacement(text: str) -> list[tuple[str, str]]:
    """`a,b;c,d` -> [(a, b), (c, d)]; `\\,` and `\\;` are literal. ValueError names a malformed pair."""
    pairs = []
    for chunk in _split_unescaped(text, ";"):
        if not chunk.strip():
            continue
        parts = _split_unescaped(chunk, ",")
        if len(parts) != 2:
            raise ValueError(f"{chunk!r} is not source,target (escape a comma inside a tag as \\,)")
        source, target = (p.replace("\\,", ",").replace("\\;", ";") for p in parts)
        pairs.append((source, target))
    return pairs


def expand_character_tag(name: str, separator: str) -> str:
    """`name_(series)` -> `name<sep>series`; `name_(costume)_(series)` -> `name_(costume)<sep>series`."""
    if not name.endswith(")") or "(" not in name:
        return name
    head, _, series = name.rpartition("(")
    return head.rstrip("_ ") + separator + series[:-1]


def without_underscores(name: str) -> str:
    """Underscores to spaces, except in names of 3 characters or fewer (kaomoji such as `^_^`, `>_<`)."""
    return name.replace("_", " ") if len(name) > 3 else name


def rewrite_labels(labels: Sequence[Label | None], separator: str, expand_characters: bool = False,
                   remove_underscore: bool = False, replacements: Sequence[tuple[str, str]] = ()) -> list[Label | None]:
    """Apply the name rewrites once to every label (see the module docstring for the order)."""
    table = dict(replacements)
    rewritten: list[Label | None] = []
    for label in labels:
        if label is None:
            rewritten.append(None)
            continue
        expanded = expand_character_tag(label.name, separator) if expand_characters and label.category == "character" else label.name
        parts = expanded.split(separator) if expanded != label.name else [label.name]
        if remove_underscore:
            parts = [without_underscores(part) for part in parts]
        parts = [table.get(part, part) for part in parts]
        name = separator.join(parts)
        rewritten.append(replace(label, name=name, parts=tuple(parts) if len(parts) > 1 else ()))
    return rewritten


# ---------------------------------------------------------------------------------------------------------
# choosing tags
# ---------------------------------------------------------------------------------------------------------


def _best_of(category: str, labels: Sequence[Label | None], probs: Sequence[float], floor: float) -> Label | None:
    """The most probable label of `category` (first on ties), if its probability reaches `floor`."""
    best, best_p = None, None
    for label, p in zip(labels, probs):
        if label is not None and label.category == category and (best_p is None or p > best_p):
            best, best_p = label, p
    return best if best is not None and best_p >= floor else None


def _place(tags: list[str], tag: str | None, first: bool, last: bool) -> None:
    if tag is not None and first:
        tags.insert(0, tag)
    elif tag is not None and last:
        tags.append(tag)


def _flatten(labels: list[Label]) -> list[str]:
    """Each label's tags (two for an expanded character), repeats dropped, the first kept."""
    seen, result = set(), []
    for label in labels:
        for tag in label.tags:
            if tag not in seen:
                seen.add(tag)
                result.append(tag)
    return result


def choose_tags(probs: Sequence[float], labels: Sequence[Label | None], options: TagOptions,
                by_probability: bool = False, rating_floor: float = 0.0) -> list[str]:
    """The tags of one image, in caption order.

    `by_probability` orders the thresholded tags by probability (tag_mapping.json models) instead of the label
    order (selected_tags.csv models); `rating_floor` is the probability a rating or quality label must reach
    (0 for selected_tags.csv models, whose rating is an argmax; the lowest threshold for the others).
    """
    characters: list[tuple[float, int, Label]] = []
    others: list[tuple[float, int, Label]] = []
    for index, (label, p) in enumerate(zip(labels, probs)):
        if label is None or label.category not in THRESHOLDED or label.name in options.undesired_tags:
            continue
        if p < options.thresholds[label.category]:
            continue
        bucket = characters if label.category == "character" and options.character_tags_first else others
        bucket.append((float(p), index, label))
    if by_probability:
        characters.sort(key=lambda item: (-item[0], item[1]))
        others.sort(key=lambda item: (-item[0], item[1]))
    tags = _flatten([label for _, _, label in characters + others])
    for category, first, last in (("quality", options.use_quality_tags, options.use_quality_tags_as_last_tag),
                                  ("rating", options.use_rating_tags, options.use_rating_tags_as_last_tag)):
        if first or last:
            best = _best_of(category, labels, probs, rating_floor)
            _place(tags, best.name if best and best.name not in options.undesired_tags else None, first, last)
    for tag in reversed(options.always_first_tags):
        if tag in tags:
            tags.remove(tag)
            tags.insert(0, tag)
    return tags


def split_tags(text: str, separator: str) -> list[str]:
    """Tags of a caption text: split on the separator without its spaces, each stripped, empties dropped."""
    stripped = separator.strip() or separator
    return [tag.strip() for tag in text.strip("\n").split(stripped) if tag.strip()]


def appended_tags(existing_text: str, new_tags: Sequence[str], separator: str) -> list[str]:
    """`--append_tags`: the existing file's tags, then the new tags it does not have yet."""
    existing = split_tags(existing_text, separator)
    return existing + [tag for tag in new_tags if tag not in existing]
