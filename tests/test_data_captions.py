"""Caption processing: each option alone and in combination, in the documented order, by hand."""

from __future__ import annotations

import random

import pytest

from lorakit.data.captions import CaptionContext, expand_wildcards, process_caption, warmup_step_limit
from lorakit.data.specs import SubsetSpec


def run(caption: str, seed: int = 0, context: CaptionContext | None = None, replacements=None, **options) -> str:
    return process_caption(caption, SubsetSpec(image_dir=None, **options), random.Random(seed), context,
                           replacements)


def test_untouched_without_options():
    assert run("a,b ,  c") == "a,b ,  c"  # no tag processing: the text stays as written


def test_prefix_suffix_with_spaces():
    assert run("girl, red hair", caption_prefix="sks", caption_suffix="best quality") == \
        "sks girl, red hair best quality"


def test_dropout_rate_one_and_zero():
    assert run("a, b", caption_dropout_rate=1.0) == ""
    assert run("a, b", caption_dropout_rate=0.0) == "a, b"


def test_dropout_every_n_epochs_counts_from_one():
    options = dict(caption_dropout_every_n_epochs=2, caption_prefix="p")
    assert [run("a", context=CaptionContext(epoch=e), **options) for e in (0, 1, 2, 3, 4)] == \
        ["p a", "p a", "", "p a", ""]


def test_first_line_only_without_wildcards():
    assert run("first, line\nsecond line") == "first, line"


def test_wildcards_pick_one_option_and_keep_escaped_braces():
    rng = random.Random(1)
    out = expand_wildcards("a {red|blue|green} {{x}} {solo}", rng)
    colour = out.split()[1]
    assert colour in ("red", "blue", "green") and out == f"a {colour} {{x}} solo"


def test_wildcard_lines_and_prefix_on_the_chosen_line():
    seen = {run("one\ntwo\n\nthree", seed=s, enable_wildcard=True, caption_prefix="p") for s in range(40)}
    assert seen == {"p one", "p two", "p three"}


def test_keep_tokens_fixed_head_rest_shuffled():
    tags = [f"t{i}" for i in range(8)]
    outputs = {run(",".join(tags), seed=s, shuffle_caption=True, keep_tokens=2) for s in range(20)}
    for out in outputs:
        parts = out.split(", ")
        assert parts[:2] == ["t0", "t1"] and sorted(parts[2:]) == tags[2:]
    assert len(outputs) > 1


def test_keep_tokens_separator_twice_gives_fixed_suffix():
    caption = "sks, girl ||| red, blue, green ||| masterpiece, best"
    for s in range(10):
        parts = run(caption, seed=s, shuffle_caption=True, keep_tokens_separator="|||").split(", ")
        assert parts[:2] == ["sks", "girl"] and parts[-2:] == ["masterpiece", "best"]
        assert sorted(parts[2:5]) == ["blue", "green", "red"]


def test_keep_tokens_separator_removed_even_without_shuffling():
    # sd-scripts leaves "|||" in the text here (inventory appendix A.8); we never do.
    assert run("sks ||| red, blue", keep_tokens_separator="|||") == "sks, red, blue"


def test_custom_separator_and_join_with_comma_space():
    assert run("a;b; c", shuffle_caption=True, caption_separator=";", keep_tokens=3) == "a, b, c"


def test_tag_dropout_rate_one_drops_only_flexible_tags():
    assert run("a, b, c, d", keep_tokens=1, caption_tag_dropout_rate=1.0) == "a"
    assert run("a, b, c", caption_tag_dropout_rate=0.0, shuffle_caption=False, keep_tokens=0) == "a, b, c"


def test_secondary_separator_keeps_groups_together():
    for s in range(10):
        out = run("x, hair$$red, y", seed=s, shuffle_caption=True, secondary_separator="$$")
        assert sorted(out.split(", ")) == ["hair,red", "x", "y"]


@pytest.mark.parametrize("step, expected", [(0, "a, b"), (5, "a, b, c, d"), (10, "a, b, c, d, e, f"),
                                            (9, "a, b, c, d, e")])
def test_token_warmup_truncates_before_shuffle(step, expected):
    # 6 flexible tags, min 2, limit 10: floor(step * (6 - 2) / 10) + 2 tags.
    context = CaptionContext(epoch=1, step=step, max_train_steps=100)
    assert run("a, b, c, d, e, f", context=context, token_warmup_min=2, token_warmup_step=10) == expected


def test_token_warmup_fraction_of_max_steps():
    assert warmup_step_limit(SubsetSpec(image_dir=None, token_warmup_step=0.25), 400) == 100
    context = CaptionContext(epoch=1, step=50, max_train_steps=400)  # floor(50 * 3 / 100) + 1 = 2 tags
    assert run("a, b, c, d", context=context, token_warmup_step=0.25) == "a, b"


def test_replacements_plain_list_and_whole_caption():
    assert run("a photo of <tok>", replacements={"<tok>": "sks dog"}) == "a photo of sks dog"
    assert run("a <t>", seed=3, replacements={"<t>": ["x y"]}) == "a x y"
    assert run("anything", replacements={"": "fixed"}) == "fixed"


def test_full_order_prefix_wildcard_split_shuffle_drop_secondary_replace():
    # prefix joins the first tag and its wildcard is expanded; the separator (not keep_tokens) fixes the head
    # "pre a sks, t1"; tag dropout 1.0 removes the flexible t2, t3; the tail after the second ||| carries
    # the suffix; then $$ becomes "," and <x> is replaced.
    out = run("sks, t1 ||| t2, t3 ||| tail$$end", seed=5, caption_prefix="pre {a|a}", caption_suffix="<x>",
              enable_wildcard=True, keep_tokens_separator="|||", shuffle_caption=True, keep_tokens=1,
              caption_tag_dropout_rate=1.0, secondary_separator="$$", replacements={"<x>": "X"})
    assert out == "pre a sks, t1, tail,end X"


def test_same_seed_same_caption():
    options = dict(shuffle_caption=True, caption_tag_dropout_rate=0.3, enable_wildcard=True)
    caption = "{a|b|c}, d, e, f, g, h"
    assert run(caption, seed=9, **options) == run(caption, seed=9, **options)
