"""--max_token_length 150/225 and --weighted_captions on tiny SD 1.x, SD 2.x and SDXL models (sd-scripts' rules)."""

from __future__ import annotations

import pytest
import torch

from lorakit.families.common.clip_prompts import ClipPrompts, parse_attention
from lorakit.families.sd.family import StableDiffusionFamily
from lorakit.families.sd.tiny import build_tiny_sd
from lorakit.families.sdxl.family import StableDiffusionXLFamily
from lorakit.families.sdxl.tiny import build_tiny_sdxl

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tiny():
    return {"sd1": build_tiny_sd("sd1", seed=0), "sd2": build_tiny_sd("sd2", seed=0), "sdxl": build_tiny_sdxl(seed=0)}


def family_with(cls, max_token_length=None, weighted=False):
    family = cls()
    family.prompts = ClipPrompts(max_token_length, weighted)
    return family


def test_attention_syntax_as_sd_scripts_reads_it():
    assert parse_attention("normal text") == [("normal text", 1.0)]
    assert parse_attention("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_attention("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_attention(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_attention("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    runs = parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    expected = [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
                (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]
    assert [r[0] for r in runs] == [e[0] for e in expected]
    assert [r[1] for r in runs] == pytest.approx([e[1] for e in expected])
    assert parse_attention("") == [("", 1.0)]


def test_225_tokens_are_three_windows_cut_as_sd_scripts_cuts_them(tiny):
    caption = " ".join(["a"] * 100)  # "a" is one token: 100 caption tokens
    a_id = tiny["sd1"].tokenizers[0]("a").input_ids[1]
    prompts = ClipPrompts(225)
    ids, weights = prompts.tokenize(tiny["sd1"].tokenizers[0], [caption])
    assert weights is None and ids.shape == (1, 3, 77)
    # OpenAI CLIP pads with the end token: windows are BOS + 75 ids + the sequence's last id
    assert ids[0, 0].tolist() == [BOS] + [a_id] * 75 + [EOS]
    assert ids[0, 1].tolist() == [BOS] + [a_id] * 25 + [EOS] * 51
    assert ids[0, 2].tolist() == [BOS] + [EOS] * 76
    # OpenCLIP pads with "!" (id 0): a full window ends in EOS, a window starting in padding gets EOS second
    ids, _ = prompts.tokenize(tiny["sd2"].tokenizers[0], [caption])
    assert ids[0, 0].tolist() == [BOS] + [a_id] * 75 + [EOS]
    assert ids[0, 1].tolist() == [BOS] + [a_id] * 25 + [EOS] + [0] * 50
    assert ids[0, 2].tolist() == [BOS, EOS] + [0] * 75


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_long_caption_states_are_the_windows_joined(tiny, version):
    comps = tiny[version]
    caption = ", ".join(f"tag{i}" for i in range(60))  # well over 75 tokens
    family = family_with(StableDiffusionFamily, 225)
    states = family.encode_text(comps, [caption, "short"]).tensors["encoder_hidden_states"]
    assert states.shape[:2] == (2, 227)
    ids, _ = family.prompts.tokenize(comps.tokenizers[0], [caption])
    with torch.no_grad():
        windows = comps.text_encoders[0](ids[0]).last_hidden_state  # (3, 77, width), each window on its own
    expected = torch.cat([windows[0, :1], windows[0, 1:76], windows[1, 1:76], windows[2, 1:76], windows[2, 76:]])
    torch.testing.assert_close(states[0], expected)
    # 150 tokens: two windows, 152 states
    assert family_with(StableDiffusionFamily, 150).encode_text(comps, [caption]).tensors["encoder_hidden_states"].shape[1] == 152


def test_weighted_caption_scales_each_token_state(tiny):
    comps = tiny["sd1"]
    plain = family_with(StableDiffusionFamily).encode_text(comps, ["red car"]).tensors["encoder_hidden_states"]
    weighted = family_with(StableDiffusionFamily, None, True).encode_text(comps, ["(red:1.5) car"]).tensors["encoder_hidden_states"]
    factors = torch.ones(77)
    factors[1] = 1.5  # BOS, then "red"
    torch.testing.assert_close(weighted[0], plain[0] * factors.unsqueeze(-1))
    # with windows: weights follow their token into its window; [x] divides by 1.1
    long_caption = " ".join(["a"] * 80) + " [b]"
    states = family_with(StableDiffusionFamily, 150, True).encode_text(comps, [long_caption]).tensors["encoder_hidden_states"]
    unweighted = family_with(StableDiffusionFamily, 150).encode_text(comps, [" ".join(["a"] * 80) + " b"]).tensors["encoder_hidden_states"]
    factors = torch.ones(152)
    factors[1 + 80] = 1 / 1.1
    torch.testing.assert_close(states[0], unweighted[0] * factors.unsqueeze(-1))


def test_sdxl_long_weighted_captions(tiny):
    comps = tiny["sdxl"]
    caption = ", ".join(f"(tag{i}:1.2)" for i in range(40))
    family = family_with(StableDiffusionXLFamily, 225, True)
    text = family.encode_text(comps, [caption, "short"]).tensors
    assert text["encoder_hidden_states"].shape[:2] == (2, 227)
    (ids1, w1), (ids2, w2) = family.tokenize(comps, [caption])
    te2 = comps.text_encoders[1]
    with torch.no_grad():
        out2 = te2(ids2[0], output_hidden_states=True)
    # the pooled embedding is the first window's
    torch.testing.assert_close(text["text_embeds"][0], out2.text_embeds[0])
    assert w1.shape == (1, 3, 77) and w1.max() == pytest.approx(1.2) and w1[0, :, 0].eq(1).all()
    width1 = comps.text_encoders[0].config.hidden_size
    bigg = text["encoder_hidden_states"][0, :, width1:]
    expected = torch.cat([out2.hidden_states[-2][0, :1], *(out2.hidden_states[-2][k, 1:76] for k in range(3)),
                          out2.hidden_states[-2][2, 76:]])
    factors = torch.cat([torch.ones(1), w2[0, :, 1:-1].reshape(-1), torch.ones(1)])
    torch.testing.assert_close(bigg, expected * factors.unsqueeze(-1))


def test_options_reach_the_family_and_t5_families_refuse_weights(tmp_path):
    from lorakit.config import parse_train_args
    from lorakit.families.registry import get_family

    base = ["--pretrained_model_name_or_path", str(tmp_path), "--train_data_dir", str(tmp_path), "--output_dir",
            str(tmp_path), "--resolution", "64", "--network_module", "networks.lora"]
    cfg, _ = parse_train_args(base + ["--max_token_length", "225", "--weighted_captions"])
    assert ClipPrompts.from_options(cfg) == ClipPrompts(225, True)
    assert get_family("sd").option_problems(cfg) == []
    from lorakit.families.registry import family_names

    for name in family_names():
        refused = any(p.startswith("--weighted_captions is not available") for p in get_family(name).option_problems(cfg))
        assert refused is (name not in ("sd", "sdxl")), name
    for name in ("flux", "sd3"):
        assert f"--max_token_length is ignored for --family {name}" in get_family(name).option_warnings(cfg)
