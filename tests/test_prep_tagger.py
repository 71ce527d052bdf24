"""`lorakit tag`: a tiny WD14-interface ONNX model (built here with the onnx helper API) run by onnxruntime.

The model's probabilities are a linear function of the image's mean BGR colour, so a pure red/green/blue
image gets the probability vector in prep_models.PROBS and every expected caption below is worked out by hand.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorakit.cli.main import main
from prep_models import write_colour_image, write_tagger


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A --model_dir holding the tiny tagger where sd-scripts keeps --repo_id test/tiny-tagger."""
    root = tmp_path_factory.mktemp("taggers")
    write_tagger(root / "test_tiny-tagger")
    write_tagger(root / "test_tiny-mapped" / "v1", layout="mapping")
    return root


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    for colour in ("red", "green", "blue"):
        write_colour_image(folder / f"{colour}.png", colour)
    return folder


def tag(folder: Path, model_dir: Path, *options: str, repo: str = "test/tiny-tagger") -> int:
    return main(["tag", str(folder), "--model_dir", str(model_dir), "--repo_id", repo, "--onnx", *options])


def caption(folder: Path, name: str, ext: str = ".txt") -> str:
    return (folder / f"{name}{ext}").read_text(encoding="utf-8")


def test_default_thresholds_order_and_files(images, model_dir):
    assert tag(images, model_dir) == 0
    # label order (selected_tags.csv models); 0.35 for every category; ratings only on request
    assert caption(images, "red") == "1girl, long_hair, ^_^, red_theme, outdoors, alice_(wonderland), signature\n"
    assert caption(images, "green") == "smile, outdoors\n"
    assert caption(images, "blue") == "long_hair, alice_(wonderland), bob\n"


def test_category_thresholds_rating_and_character_order(images, model_dir):
    assert tag(images, model_dir, "--general_threshold", "0.55", "--character_threshold", "0.5",
               "--meta_threshold", "1.1", "--character_tags_first", "--use_rating_tags", "--remove_underscore") == 0
    assert caption(images, "red") == "sensitive, alice (wonderland), 1girl, ^_^, red theme\n"
    assert caption(images, "blue") == "general, bob, long hair\n"
    assert tag(images, model_dir, "--thresh", "0.85", "--use_rating_tags_as_last_tag", "--caption_extension", ".tags") == 0
    assert caption(images, "red", ".tags") == "1girl, sensitive\n"
    assert caption(images, "green", ".tags") == "smile, outdoors, general\n"


def test_always_first_undesired_replacement_and_expansion(images, model_dir):
    assert tag(images, model_dir, "--always_first_tags", "red_theme,long_hair", "--undesired_tags", "signature, ^_^",
               "--tag_replacement", r"1girl,solo\, girl;outdoors,outside", "--character_tag_expand") == 0
    assert caption(images, "red") == "red_theme, long_hair, solo, girl, outside, alice, wonderland\n"
    assert caption(images, "blue") == "long_hair, alice, wonderland, bob\n"


def test_separator_frequency_and_append(images, model_dir, capsys):
    (images / "red.txt").write_text("my_token, 1girl\n", encoding="utf-8")
    assert tag(images, model_dir, "--append_tags", "--frequency_tags", "--character_threshold", "0.9",
               "--meta_threshold", "0.9") == 0
    assert caption(images, "red") == "my_token, 1girl, long_hair, ^_^, red_theme, outdoors\n"  # kept, 1girl once
    out = capsys.readouterr().out  # most frequent first, ties in the order first seen (blue, green, red)
    assert "Tag frequencies:\nlong_hair: 2\noutdoors: 2\nbob: 1\nsmile: 1\n1girl: 1\n^_^: 1\nred_theme: 1\n" in out
    assert tag(images, model_dir, "--caption_separator", " | ", "--general_threshold", "0.85") == 0
    assert caption(images, "green") == "smile | outdoors\n"


def test_output_path_json_reads_back_with_the_trainers_reader(images, model_dir, tmp_path):
    from lorakit.data.finetune import read_metadata_file

    out = tmp_path / "meta.json"
    assert tag(images, model_dir, "--output_path", str(out), "--batch_size", "2") == 0
    assert not list(images.glob("*.txt"))  # metadata instead of caption files, as sd-scripts
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data[str((images / "blue.png").resolve())] == {"tags": "long_hair, alice_(wonderland), bob", "image_size": [24, 24]}
    entries = {e.path.name: e for e in read_metadata_file(out, images)}
    assert entries["green.png"].caption == "smile, outdoors" and entries["green.png"].size == (24, 24)
    lines = tmp_path / "meta.jsonl"
    assert tag(images, model_dir, "--output_path", str(lines)) == 0
    rows = [json.loads(line) for line in lines.read_text(encoding="utf-8").splitlines()]
    assert [Path(r["image_path"]).name for r in rows] == ["blue.png", "green.png", "red.png"]
    assert rows[2]["caption"].startswith("1girl, long_hair") and rows[2]["image_size"] == [24, 24]
    assert {e.path.name for e in read_metadata_file(lines, images)} == {"blue.png", "green.png", "red.png"}


def test_recursive_workers_and_unreadable_image(images, model_dir, caplog):
    write_colour_image(images / "sub" / "deep.jpg", "green")
    (images / "broken.png").write_bytes(b"not an image")
    assert tag(images, model_dir) == 0
    assert not (images / "sub" / "deep.txt").exists()
    with caplog.at_level(logging.WARNING):
        assert tag(images, model_dir, "--recursive", "--max_data_loader_n_workers", "1", "--batch_size", "2") == 0
    assert caption(images / "sub", "deep") == "smile, outdoors\n"
    assert not (images / "broken.txt").exists()
    assert any("broken.png" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_tag_mapping_layout_sorts_by_probability(images, model_dir):
    """owner/name/subfolder taggers: NCHW in [-1, 1], logits out, tags by probability, rating above the floor."""
    assert tag(images, model_dir, "--use_rating_tags", "--character_tags_first", repo="test/tiny-mapped/v1") == 0
    assert caption(images, "red") == "sensitive, alice_(wonderland), 1girl, red_theme, ^_^, long_hair, signature, outdoors\n"
    assert caption(images, "blue") == "general, bob, alice_(wonderland), long_hair\n"


def test_model_dir_holding_the_files_directly(images, model_dir):
    assert main(["tag", str(images), "--model_dir", str(model_dir / "test_tiny-tagger"), "--thresh", "0.85"]) == 0
    assert caption(images, "blue") == "long_hair, bob\n"


def test_fixed_batch_model_and_input_size(tmp_path, images):
    from lorakit.prep.wd14 import TaggerModel, locate_model

    folder = write_tagger(tmp_path / "fixed", size=16, batch=1)
    model = TaggerModel(locate_model(folder, "x/y"))
    assert (model.input_size, model.fixed_batch, model.channels_first) == (16, 1, False)
    assert main(["tag", str(images), "--model_dir", str(folder), "--batch_size", "3", "--thresh", "0.85"]) == 0
    assert caption(images, "green") == "smile, outdoors\n"


def test_preprocessing_pads_white_bgr_float():
    from lorakit.prep.wd14 import preprocess

    wide = Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0]]], dtype=np.uint8))  # 2x1: red, green
    pixels = preprocess(wide, 2)
    assert pixels.dtype == np.float32 and pixels.shape == (2, 2, 3)
    expected = np.array([[[0, 0, 255], [0, 255, 0]], [[255, 255, 255], [255, 255, 255]]], dtype=np.float32)
    np.testing.assert_array_equal(pixels, expected)  # BGR, padded at the bottom with white, 0-255
    tall = np.zeros((4, 2, 3), dtype=np.uint8)
    tall[:, :, 2] = 200  # blue 200 in RGB
    pixels = preprocess(Image.fromarray(tall), 2)  # padded to 4x4 (one white column each side), area to 2x2
    np.testing.assert_allclose(pixels[..., 0], np.full((2, 2), (200 + 255) / 2), atol=0.5)  # B: half image, half white
    np.testing.assert_allclose(pixels[..., 1:], np.full((2, 2, 2), 255 / 2), atol=0.5)
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))  # fully transparent -> white
    np.testing.assert_array_equal(preprocess(rgba, 2), np.full((2, 2, 3), 255, dtype=np.float32))


def test_tag_rules_units():
    from lorakit.prep.tag_rules import expand_character_tag, parse_tag_replacement, without_underscores

    assert parse_tag_replacement(r"a\,b,c;d\;e,f;") == [("a,b", "c"), ("d;e", "f")]
    with pytest.raises(ValueError, match="source,target"):
        parse_tag_replacement("a,b,c")
    assert expand_character_tag("chara_(costume)_(series)", ", ") == "chara_(costume), series"
    assert [without_underscores(t) for t in ("^_^", ">_<", "long_hair", "o_o")] == ["^_^", ">_<", "long hair", "o_o"]


def test_all_problems_at_once_before_the_model(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = main(["tag", str(missing), "--thresh", "nan", "--character_threshold", "-1", "--batch_size", "0",
                 "--tag_replacement", "a,b,c", "--model_dir", str(tmp_path / "models"), "--output_path",
                 str(tmp_path / "no" / "out.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: 7 problems")
    for text in ("train_data_dir", "--thresh nan", "--character_threshold -1", "--batch_size 0", "--tag_replacement",
                 "--output_path", "model.onnx and selected_tags.csv", "SmilingWolf/wd-v1-4-convnext-tagger-v2"):
        assert text in err
    assert not (tmp_path / "models").exists()


def test_unknown_model_folder_names_files_and_writes_nothing(images, tmp_path, capsys):
    shutil.rmtree(tmp_path / "models", ignore_errors=True)
    assert main(["tag", str(images), "--model_dir", str(tmp_path / "models"), "--repo_id", "me/tagger/v3"]) == 2
    err = capsys.readouterr().err
    assert "model_optimized.onnx and tag_mapping.json" in err and str(tmp_path / "models" / "me_tagger" / "v3") in err
    assert not list(images.glob("*.txt"))


def test_mismatched_tag_list_is_named(tmp_path, images, capsys):
    folder = write_tagger(tmp_path / "bad")
    lines = (folder / "selected_tags.csv").read_text(encoding="utf-8").splitlines()
    (folder / "selected_tags.csv").write_text("\n".join(lines[:-2]) + "\n", encoding="utf-8")
    assert main(["tag", str(images), "--model_dir", str(folder)]) == 2
    assert "selected_tags.csv lists 11 tags" in capsys.readouterr().err
    assert not list(images.glob("*.txt"))
