"""`lorakit caption`: BLIP, GIT and Qwen2(.5)-VL captioners of the real architectures, tiny and random, saved to a
folder with a tokenizer and image processor and loaded from it offline.

Random weights caption nonsense, so each model's captions are checked against transformers' own documented
way of running it (unbatched, by hand), which the batched command must reproduce token for token.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from lorakit.cli.main import main
from prep_models import write_blip, write_colour_image, write_git, write_qwen_vl


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("captioners")
    return {"blip": write_blip(root / "blip"), "git": write_git(root / "git"),
            "qwen2_5_vl": write_qwen_vl(root / "qwen25"), "qwen2_vl": write_qwen_vl(root / "qwen2", "qwen2_vl")}


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    write_colour_image(folder / "red.png", "red", (40, 30))
    write_colour_image(folder / "blue.jpg", "blue", (50, 70))
    return folder


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def blip_reference(folder: Path, image: Image.Image, **generate) -> str:
    """transformers' conditional BLIP captioning with sd-scripts' prompt, the prompt cut from the result."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor, model = BlipProcessor.from_pretrained(folder), BlipForConditionalGeneration.from_pretrained(folder)
    inputs = processor(images=image, text="a picture of", return_tensors="pt")
    output = model.generate(**inputs, **generate)[0]
    return processor.decode(output[inputs["input_ids"].shape[1] - 1:], skip_special_tokens=True)


def test_blip_beam_search_matches_transformers(images, models):
    assert main(["caption", str(images), "--caption_weights", str(models["blip"]), "--beam_search", "--num_beams", "2",
                 "--batch_size", "2", "--max_length", "12"]) == 0
    for name in ("red.png", "blue.jpg"):
        with Image.open(images / name) as image:
            expected = blip_reference(models["blip"], image.convert("RGB"), num_beams=2, max_length=12, min_length=5)
        assert read((images / name).with_suffix(".caption")) == " ".join(expected.split()) + "\n"
        assert len(expected.split()) >= 1


def test_blip_sampling_is_seeded_and_existing_captions_are_kept(images, models, capsys):
    base = ["caption", str(images), "--caption_weights", str(models["blip"]), "--max_length", "20"]
    assert main(base) == 0
    first = {name: read(images / name) for name in ("red.caption", "blue.caption")}
    assert main([*base, "--overwrite"]) == 0
    assert {name: read(images / name) for name in first} == first  # nucleus sampling from the same seed
    assert main([*base, "--overwrite", "--seed", "7"]) == 0
    assert {name: read(images / name) for name in first} != first
    (images / "blue.caption").write_text("keep me\n", encoding="utf-8")
    (images / "red.caption").unlink()
    assert main(base) == 0
    assert read(images / "blue.caption") == "keep me\n" and read(images / "red.caption").strip()
    assert "kept 1 existing .caption files" in capsys.readouterr().out


def test_git_recursive_extension_remove_words_and_unreadable(images, models, caplog):
    write_colour_image(images / "sub" / "green.webp", "green")
    (images / "sub" / "broken.png").write_bytes(b"\x89PNG but not really")
    with caplog.at_level(logging.WARNING):
        assert main(["caption", str(images), "--model_id", str(models["git"]), "--recursive", "--caption_extension", ".txt",
                     "--min_length", "4", "--remove_words", "--batch_size", "2", "--max_data_loader_n_workers", "1"]) == 0
    assert {p.relative_to(images).as_posix() for p in images.rglob("*.txt")} == {"red.txt", "blue.txt", "sub/green.txt"}
    assert any("broken.png" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    from transformers import AutoProcessor, GitForCausalLM

    processor, model = AutoProcessor.from_pretrained(models["git"]), GitForCausalLM.from_pretrained(models["git"])
    with Image.open(images / "sub" / "green.webp") as image:
        pixels = processor(images=image.convert("RGB"), return_tensors="pt").pixel_values
    expected = processor.batch_decode(model.generate(pixel_values=pixels, max_length=50, min_length=4), skip_special_tokens=True)[0]
    assert read(images / "sub" / "green.txt").strip() == " ".join(expected.split())


@pytest.mark.parametrize("version", ["qwen2_5_vl", "qwen2_vl"])
def test_qwen_vl_batched_matches_one_by_one(images, models, version):
    from transformers import AutoImageProcessor, AutoTokenizer

    from lorakit.prep.caption_models import _qwen_class

    prompt = "describe this image"
    assert main(["caption", str(images), "--model_id", str(models[version]), "--prompt", prompt, "--batch_size", "2",
                 "--max_length", "6"]) == 0
    folder = models[version]
    tokenizer, processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    model = _qwen_class(version).from_pretrained(folder)
    for name in ("red.png", "blue.jpg"):  # different sizes: different image-token counts, so the batch is padded
        with Image.open(images / name) as image:
            vision = processor(images=image.convert("RGB"), return_tensors="pt")
        count = int(vision["image_grid_thw"][0].prod()) // processor.merge_size ** 2
        text = (f"<|im_start|>user\n<|vision_start|>{'<|image_pad|>' * count}<|vision_end|>{prompt}<|im_end|>\n"
                "<|im_start|>assistant\n")
        tokens = tokenizer(text, return_tensors="pt")
        output = model.generate(**tokens, **vision, max_new_tokens=6, do_sample=False)
        expected = tokenizer.decode(output[0, tokens["input_ids"].shape[1]:], skip_special_tokens=True)
        assert read((images / name).with_suffix(".caption")) == " ".join(expected.split()) + "\n"


def test_model_type_comes_from_the_folder(images, models):
    from lorakit.cli.prep import parse_caption_args

    request, hub_id = parse_caption_args([str(images), "--model_id", str(models["git"])])
    assert (request.settings.model_type, request.settings.length_limits(), hub_id) == ("git", {"max_length": 50}, None)
    request, _ = parse_caption_args([str(images), "--caption_weights", str(models["blip"])])
    assert request.settings.length_limits() == {"max_length": 75, "min_length": 5}
    request, _ = parse_caption_args([str(images), "--model_id", str(models["qwen2_5_vl"]), "--min_length", "3"])
    assert request.settings.length_limits(new_tokens=True) == {"max_new_tokens": 256, "min_new_tokens": 3}


def test_nothing_to_caption_loads_no_model(images, tmp_path, capsys):
    empty_model = tmp_path / "not_really_blip"
    empty_model.mkdir()
    (empty_model / "config.json").write_text(json.dumps({"model_type": "blip"}), encoding="utf-8")
    for name in ("red", "blue"):
        (images / f"{name}.caption").write_text("done\n", encoding="utf-8")
    assert main(["caption", str(images), "--caption_weights", str(empty_model)]) == 0
    assert "no images to caption" in capsys.readouterr().out


def test_bad_options_all_reported_before_loading(tmp_path, models, capsys):
    not_a_model = tmp_path / "plain"
    not_a_model.mkdir()
    code = main(["caption", str(tmp_path / "missing"), "--model_id", str(not_a_model), "--top_p", "2", "--num_beams",
                 "0", "--max_length", "inf"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: 5 problems")
    for text in ("train_data_dir", "no config.json", "--top_p 2", "--num_beams 0", "--max_length inf"):
        assert text in err
    assert main(["caption", str(tmp_path), "--model_id", str(models["git"]), "--prompt", "hi", "--model_type", "blip"]) == 2
    err = capsys.readouterr().err
    assert "--model_type blip" in err and "holds a git model" in err and "GIT captions an image without a prompt" in err
    assert main(["caption", str(tmp_path), "--caption_weights", "model_large_caption.pth"]) == 2
    assert "original BLIP checkpoints" in capsys.readouterr().err
    assert main(["caption", str(tmp_path), "--model_type", "git"]) == 2
    assert "microsoft/git-large-textcaps" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.caption"))


def test_remove_text_phrases():
    from lorakit.prep.captioner import remove_text_phrases

    assert remove_text_phrases('a poster with the words "big sale" on the wall') == "a poster"
    assert remove_text_phrases("a red sign that says stop on it , near a road") == "a red sign, near a road"
    assert remove_text_phrases("a shirt with the number 23 on it") == "a shirt"
    assert remove_text_phrases("a cat on a sofa") == "a cat on a sofa"
