"""Sample images during training: prompt files, prompt weighting, image names, and no effect on training."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from helpers import write_dreambooth_folder
from lorakit.config import parse_train_args
from lorakit.errors import ConfigError
from lorakit.sampling.prompts import read_sample_prompts
from lorakit.objectives.samplers import SAMPLERS
from lorakit.families.common.prompt_weighting import encode_weighted_prompts, parse_prompt_weights
from lorakit.families.sd.tiny import build_tiny_sd, save_sd_diffusers_folder
from lorakit.training.run import train
from lorakit.training.sample_events import SampleSchedule, sample_file_name


# --------------------------------------------------------------------------------------------- prompt files


def test_txt_prompts(tmp_path):
    file = tmp_path / "p.txt"
    file.write_text(
        "# comment\n\nsks toy, square --n blurry, low --w 100 --h 64 --d 7 --l 5.5 --s 3 --ss euler_a\n"
        "plain prompt --g 3.5 --zz ignored\n", encoding="utf-8")
    first, second = read_sample_prompts(file)
    assert (first.prompt, first.negative_prompt, first.width, first.height) == ("sks toy, square", "blurry, low", 96, 64)
    assert (first.seed, first.scale, first.sample_steps, first.sample_sampler) == (7, 5.5, 3, "euler_a")
    assert (second.index, second.width, second.sample_steps, second.scale, second.guidance_scale) == (1, 512, 30, 7.5, 3.5)


def test_toml_and_json_prompts(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text('[prompt]\nwidth = 64\nsample_steps = 4\n[[prompt.subset]]\nprompt = "a"\n'
                    '[[prompt.subset]]\nprompt = "b"\nwidth = 128\nseed = 3\n', encoding="utf-8")
    a, b = read_sample_prompts(toml)
    assert (a.prompt, a.width, a.sample_steps, b.width, b.seed) == ("a", 64, 4, 128, 3)
    js = tmp_path / "p.json"
    js.write_text('[{"prompt": "x", "height": 72}, "y --d 9"]', encoding="utf-8")
    x, y = read_sample_prompts(js)
    assert (x.height, y.prompt, y.seed) == (72, "y", 9)


def test_bad_prompt_files_name_the_place(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("ok\nbroken --w wide\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.txt:2: --w must be an integer"):
        read_sample_prompts(bad)
    with pytest.raises(ConfigError, match="no such file"):
        read_sample_prompts(tmp_path / "missing.txt")
    js = tmp_path / "bad.json"
    js.write_text('[{"promt": "x"}]', encoding="utf-8")
    with pytest.raises(ConfigError, match="entry 1: unknown key 'promt'"):
        read_sample_prompts(js)


# --------------------------------------------------------------------------------------------- weighting


def test_attention_syntax():
    assert parse_prompt_weights("a (b) [c] (d:1.5) \\(e\\)") == [
        ("a ", 1.0), ("b", pytest.approx(1.1)), (" ", 1.0), ("c", pytest.approx(1 / 1.1)), (" ", 1.0),
        ("d", 1.5), (" (e)", 1.0)]
    assert parse_prompt_weights("((x))") == [("x", pytest.approx(1.21))]
    assert parse_prompt_weights("(unclosed") == [("unclosed", pytest.approx(1.1))]


def test_weighted_encoder_matches_plain_encoding_without_weights():
    comps = build_tiny_sd("sd1", seed=0)
    encoder, tokenizer = comps.text_encoders[0], comps.tokenizers[0]
    ids = tokenizer(["a red square"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    plain = encoder(ids).last_hidden_state
    ours = encode_weighted_prompts(encoder, tokenizer, ["a red square", "(a red square:1.0)"])
    assert ours.shape == (2, 77, plain.shape[-1])
    assert torch.allclose(ours[0], plain[0], atol=1e-5) and torch.allclose(ours[1], plain[0], atol=1e-5)
    weighted = encode_weighted_prompts(encoder, tokenizer, ["a (red:1.5) square"])
    assert not torch.allclose(weighted[0], plain[0], atol=1e-4)
    long = encode_weighted_prompts(encoder, tokenizer, [" ".join(["square"] * 100), "short"])
    assert long.shape[1] == 154, "prompts beyond 75 tokens take a second chunk; the batch shares it"


def test_weighting_restores_the_mean_and_survives_a_zero_mean():
    from lorakit.families.common.prompt_weighting import _weighted

    hidden = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    weights = torch.tensor([1.0, 1.5, 1.0, 0.5, 1.0, 1.0]).reshape(1, -1, 1)
    out = _weighted(hidden, weights)
    torch.testing.assert_close(out.mean(), hidden.mean())  # sd-scripts: the overall mean is kept
    assert not torch.allclose(out, hidden)
    centred = torch.tensor([[1.0, -1.0], [2.0, -2.0]]).reshape(1, 2, 2)  # mean exactly 0 before and after weighting
    assert torch.equal(_weighted(centred, torch.ones(1, 2, 1)), centred)
    result = _weighted(centred, torch.tensor([1.0, 2.0]).reshape(1, 2, 1))
    assert torch.isfinite(result).all() and torch.equal(result, centred * torch.tensor([1.0, 2.0]).reshape(1, 2, 1))


# --------------------------------------------------------------------------------------------- schedule and names


def test_schedule_and_names():
    steps = SampleSchedule(every_n_steps=2, every_n_epochs=None, at_first=False)
    assert [s for s in range(1, 7) if steps.after_step(s)] == [2, 4, 6] and not steps.after_epoch(1)
    epochs = SampleSchedule(every_n_steps=2, every_n_epochs=2, at_first=True)
    assert not epochs.after_step(2) and epochs.after_epoch(2) and not epochs.after_epoch(3)
    assert sample_file_name("tiny", 3, epoch=None, step=40, seed=5, timestamp="20240101120000") == \
        "tiny_000040_03_20240101120000_5.png"
    assert sample_file_name(None, 0, epoch=2, step=8, seed=None, timestamp="20240101120000") == \
        "e000002_00_20240101120000.png"


def test_every_sampler_name_builds_or_says_what_is_missing():
    from lorakit.training.sample_events import sampler_problem

    for name in SAMPLERS:
        problem = sampler_problem(name, "--sample_sampler")
        # LMS needs scipy, an optional package; the message says how to install it
        assert problem is None or ("scipy" in problem and "lms" in name), problem


# --------------------------------------------------------------------------------------------- during training


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sampling")
    save_sd_diffusers_folder(build_tiny_sd("sd1", seed=0), root / "model")
    prompts = root / "prompts.txt"
    prompts.write_text("sks (toy:1.3) --w 64 --h 64 --s 2 --d 11\nsquare --n red --w 64 --h 64 --s 2 --ss euler_a\n",
                       encoding="utf-8")
    return {"model": root / "model", "data": write_dreambooth_folder(root / "data"), "prompts": prompts}


def run(world, out: Path, *extra: str):
    cfg, _ = parse_train_args([
        f"--pretrained_model_name_or_path={world['model']}", f"--train_data_dir={world['data']}", "--resolution=64",
        f"--output_dir={out}", "--output_name=tiny", "--network_module=networks.lora", "--network_dim=4",
        "--network_dropout=0.2", "--max_train_steps=4", "--learning_rate=1e-3", "--seed=5", "--train_batch_size=2",
        "--max_data_loader_n_workers=0", "--scale_weight_norms=0.001", *extra,
    ])
    return train(cfg)


def test_sampling_leaves_training_unchanged(world, tmp_path):
    plain = run(world, tmp_path / "plain")
    sampled = run(world, tmp_path / "sampled", f"--sample_prompts={world['prompts']}", "--sample_every_n_steps=2",
                  "--sample_at_first", "--sample_sampler=k_dpm_2")
    assert sampled.step_losses == plain.step_losses
    names = sorted(p.name for p in (tmp_path / "sampled" / "sample").iterdir())
    pattern = re.compile(r"tiny_(e000000|000002|000004)_0[01]_\d{14}(_11)?\.png")
    assert len(names) == 6 and all(pattern.fullmatch(n) for n in names), names
    assert sum(n.endswith("_11.png") for n in names) == 3, "the seeded prompt carries its seed in the name"


def test_epoch_sampling(world, tmp_path):
    result = run(world, tmp_path, f"--sample_prompts={world['prompts']}", "--sample_every_n_epochs=1",
                 "--sample_every_n_steps=1")
    # 4 batches per epoch and 4 steps: one epoch, so one event (epochs override steps)
    assert sorted(p.name[:12] for p in result.sample_files) == ["tiny_e000001", "tiny_e000001"]
