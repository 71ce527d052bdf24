"""`lorakit dataset`: metadata merging and cleaning (read back by the trainer's own dataset builder), resized copies
and Canny edge images."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lorakit.cli.main import main


def image(path: Path, size=(32, 32), colour=(200, 100, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def train_config(**overrides) -> SimpleNamespace:
    """The options lorakit's dataset builder reads for a fine-tuning (--in_json) run."""
    values = dict(train_data_dir=None, reg_data_dir=None, dataset_config=None, in_json=None, resolution=(64, 64),
                  train_batch_size=1, enable_bucket=False, caption_extension=".caption", seed=0, masked_loss=False,
                  prior_loss_weight=1.0, dataset_repeats=1, caption_separator=", ")
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture
def folder(tmp_path) -> Path:
    imgs = tmp_path / "imgs"
    image(imgs / "a.png")
    image(imgs / "b.jpg", (48, 32))
    (imgs / "a.caption").write_text("a photo of a cat\n", encoding="utf-8")
    (imgs / "b.caption").write_text("  a dog  \n", encoding="utf-8")
    (imgs / "a.txt").write_text("cat, small\n", encoding="utf-8")
    (imgs / "b.txt").write_text("dog\n", encoding="utf-8")
    return imgs


def test_merge_captions_and_tags_round_trip_through_the_trainer(folder, tmp_path):
    from lorakit.data.build import build_train_dataset

    out = tmp_path / "meta.json"
    assert main(["dataset", "merge-captions", str(folder), str(out)]) == 0
    assert main(["dataset", "merge-tags", str(folder), str(out)]) == 0  # updates the file it finds
    assert json.loads(out.read_text(encoding="utf-8")) == {
        "a": {"caption": "a photo of a cat", "tags": "cat, small"}, "b": {"caption": "a dog", "tags": "dog"}}
    dataset = build_train_dataset(train_config(in_json=str(out), train_data_dir=str(folder)))
    assert {e.path.name: e.caption for e in dataset.images} == {"a.png": "a photo of a cat, cat, small", "b.jpg": "a dog, dog"}


def test_full_path_recursive_in_json_and_missing_files(folder, tmp_path, caplog):
    image(folder / "sub" / "c.webp")
    (folder / "sub" / "c.txt").write_text("bird\n", encoding="utf-8")
    image(folder / "untagged.png")
    start = tmp_path / "start.json"
    start.write_text(json.dumps({"elsewhere": {"caption": "kept"}}), encoding="utf-8")
    out = tmp_path / "tags.json"
    with caplog.at_level(logging.WARNING):
        assert main(["dataset", "merge-tags", str(folder), str(out), "--in_json", str(start), "--full_path", "--recursive"]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["elsewhere"] == {"caption": "kept"}
    assert data[str((folder / "sub" / "c.webp").resolve())] == {"tags": "bird"}
    assert set(data) == {"elsewhere", *(str((folder / n).resolve()) for n in ("a.png", "b.jpg", "sub/c.webp"))}
    assert any("untagged.png" in r.getMessage() for r in caplog.records)
    from lorakit.data.finetune import read_metadata_file

    del data["elsewhere"]
    out.write_text(json.dumps(data), encoding="utf-8")
    assert {e.path.name: e.caption for e in read_metadata_file(out, None)} == {"a.png": "cat, small", "b.jpg": "dog", "c.webp": "bird"}


def test_clean_tags_and_captions(tmp_path):
    meta = tmp_path / "in.json"
    meta.write_text(json.dumps({
        "x": {"tags": "2girls, long_hair, short_hair, blue_eyes, red_eyes, blonde_hair, black_hair, smile, shirt, "
                      "white_shirt, ^_^, rating:safe", "caption": "an anime woman and a young cartoon character"},
        "y": {"tags": "1girl, long_hair, blonde_hair, black_hair, ponytail, braid, hair_ornament, star_hair_ornament",
              "caption": "a lady with people"},
        "z": {"tags": "2girls, medium_hair, blonde_hair, black_hair, ponytail, twintails, long_sleeves"},
    }), encoding="utf-8")
    out = tmp_path / "out.json"
    assert main(["dataset", "clean", str(meta), str(out)]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    # several people: two hair lengths, two eye colours, two hair colours dropped; "shirt" beside "white shirt"
    assert data["x"] == {"tags": "2girls, smile, white shirt, ^_^", "caption": "an girl and a girl"}
    # one person: nothing per-person is dropped; "hair ornament" beside "star hair ornament" is
    assert data["y"] == {"tags": "1girl, long hair, blonde hair, black hair, ponytail, braid, star hair ornament",
                         "caption": "a girl with girls"}
    # the single hair length is kept while two hair colours and two hairstyles go
    assert data["z"] == {"tags": "2girls, medium hair, long sleeves"}
    assert main(["dataset", "clean", str(tmp_path), str(out), str(tmp_path / "out3.json")]) == 0  # sd-scripts' old form
    assert json.loads((tmp_path / "out3.json").read_text(encoding="utf-8")) == data


def test_resize_sizes_names_and_associated_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    wide = np.zeros((50, 100, 3), dtype=np.uint8)
    wide[:, :, 0] = 255
    src.mkdir()
    Image.fromarray(wide).save(src / "wide.png")
    image(src / "small.jpg", (30, 30), (0, 0, 255))
    (src / "wide.txt").write_text("wide caption\n", encoding="utf-8")
    (src / "notes.md").write_text("notes\n", encoding="utf-8")
    (src / "subfolder").mkdir()
    assert main(["dataset", "resize", str(src), str(dst), "--max_resolution", "40x40, 20x20", "--divisible_by", "4",
                 "--copy_associated_files", "--save_as_png"]) == 0
    sizes = {p.name: Image.open(p).size for p in dst.glob("*.png")}
    # wide 100x50 (5000 px): 1600 px -> 56x28; 400 px -> 28x14 -> 28x12; small 30x30 fits 1600 px -> cropped to 28x28
    assert sizes == {"wide+40x40.png": (56, 28), "wide+20x20.png": (28, 12), "small+40x40.png": (28, 28),
                     "small+20x20.png": (20, 20)}
    assert np.asarray(Image.open(dst / "wide+20x20.png"))[6, 14].tolist() == [255, 0, 0]
    assert (dst / "wide+40x40.txt").read_text(encoding="utf-8") == "wide caption\n"
    assert (dst / "wide+20x20.txt").exists() and (dst / "notes.md").exists() and (dst / "wide.txt").exists()
    assert not (dst / "small+40x40.txt").exists() and not (dst / "subfolder").exists()
    assert main(["dataset", "resize", str(src), str(tmp_path / "jpg"), "--max_resolution", "16x16"]) == 0
    assert sorted(p.name for p in (tmp_path / "jpg").glob("*.jpg")) == ["small+16x16.jpg", "wide+16x16.jpg"]


def square_image(path: Path) -> Path:
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[16:48, 16:48] = 200  # a grey square: its border is the only edge
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def test_canny_marks_the_square_border(tmp_path):
    source = square_image(tmp_path / "square.png")
    assert main(["dataset", "canny", str(source), str(tmp_path / "edges.png")]) == 0
    edges = np.asarray(Image.open(tmp_path / "edges.png"))
    assert edges.shape == (64, 64) and set(np.unique(edges)) == {0, 255}
    ys, xs = np.nonzero(edges)
    near_border = (np.minimum(np.abs(ys - 15.5), np.abs(ys - 47.5)) <= 1) | (np.minimum(np.abs(xs - 15.5), np.abs(xs - 47.5)) <= 1)
    inside = (ys >= 14) & (ys <= 49) & (xs >= 14) & (xs <= 49)
    assert np.all(near_border & inside)  # every edge pixel lies on the square's outline
    for side in (edges[15:17, 20:44], edges[47:49, 20:44], edges[20:44, 15:17].T, edges[20:44, 47:49].T):
        assert np.all(side.max(axis=0) == 255)  # each side is a continuous line
    assert not edges[20:44, 20:44].any()


def test_canny_folder_and_sd_scripts_option_names(tmp_path):
    from lorakit.prep.canny import canny

    square_image(tmp_path / "in" / "one.jpg")
    square_image(tmp_path / "in" / "two.png")
    assert main(["dataset", "canny", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--thres1", "100",
                 "--thres2", "200"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["one.png", "two.png"]
    assert not canny(np.full((16, 16, 3), 90, np.uint8), 32, 224).any()  # a flat image has no edges
    faint = np.zeros((32, 32, 3), np.uint8)
    faint[:, 16:] = 20  # a weak step: its gradient (80) is above 32 but below 224 and not joined to a strong edge
    assert not canny(faint, 32, 224).any() and canny(faint, 32, 64).any()


def test_bad_options_reported_at_once(tmp_path, capsys):
    code = main(["dataset", "merge-captions", str(tmp_path / "missing"), str(tmp_path / "no" / "out.jsonl"),
                 "--in_json", str(tmp_path / "nope.json"), "--recursive"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: 5 problems")
    for text in ("train_data_dir", "does not exist", "must end in .json", "--in_json", "--recursive needs --full_path"):
        assert text in err
    assert main(["dataset", "resize", str(tmp_path), str(tmp_path / "out"), "--max_resolution", "512x,abc",
                 "--divisible_by", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max_resolution" in err and "--divisible_by 0" in err
    assert main(["dataset", "canny", str(tmp_path / "x.png"), str(tmp_path / "y.png"), "--low_threshold", "300",
                 "--high_threshold", "nan"]) == 2
    err = capsys.readouterr().err
    assert "--high_threshold nan" in err and "input" in err
    assert main(["dataset", "clean", str(tmp_path / "absent.json"), str(tmp_path / "out.json")]) == 2
    assert "absent.json" in capsys.readouterr().err
    assert main(["dataset", "frobnicate"]) == 2
    assert not list(tmp_path.rglob("*.json")) and not (tmp_path / "out").exists()


def test_help_texts(capsys):
    for argv in (["--help"], ["dataset"], ["dataset", "resize", "--help"], ["tag", "--help"], ["caption", "--help"]):
        assert main(argv) == 0
    out = capsys.readouterr().out
    for text in ("tag ", "caption ", "dataset ", "merge-captions", "--max_resolution", "--character_tags_first", "--beam_search"):
        assert text in out


def test_prep_package_stays_out_of_training_and_families():
    import ast

    root = Path(__file__).resolve().parents[1] / "src" / "lorakit"
    for path in [*(root / "prep").glob("*.py"), root / "cli" / "prep.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("lorakit.training", "lorakit.families")), (path, node.module)
