"""`--dataset_class module.Class`: a class of the user's own, imported from the working directory, gives the
examples (PIL images or paths, and captions) that lorakit's dataset buckets, caches and trains on."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from lorakit.cli.main import main
from lorakit.data.dataset_class import dataset_class_metadata
from lorakit.errors import ConfigError, DataError
from lorakit.families.sd.tiny import build_tiny_sd, save_sd_diffusers_folder

GOOD_CLASS = '''
from pathlib import Path
from PIL import Image

class Squares:
    """Two pictures made in memory (one as a mapping) and one image file named by path."""

    def __init__(self, options):
        self.size = options.resolution[0]  # the parsed options: (width, height)
        self.file = Path(options.output_dir).parent / "on_disk.png"
        Image.new("RGB", (self.size, self.size * 2), (10, 200, 30)).save(self.file)

    def __len__(self):
        return 3

    def __getitem__(self, index):
        if index == 0:
            return Image.new("RGB", (self.size, self.size), (200, 10, 10)), "a red square"
        if index == 1:
            return {"image": Image.new("RGB", (self.size * 2, self.size), (10, 10, 200)), "caption": "a blue bar"}
        return (str(self.file), "a green bar")
'''

BAD_CLASS = '''
from PIL import Image

class Broken:
    def __init__(self, options):
        pass

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return [Image.new("RGB", (8, 8)), "fine"] if index == 0 else [
            {"image": Image.new("RGB", (8, 8))}, ("no_such_file.png", "x"), (Image.new("RGB", (8, 8)), 3)][index - 1]
'''


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """The working directory, holding the user's modules; the `lorakit` command does not put it on sys.path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path
    for name in ("user_squares", "user_broken"):
        sys.modules.pop(name, None)


def test_a_class_in_the_working_directory_trains(module_dir):
    (module_dir / "user_squares.py").write_text(GOOD_CLASS, encoding="utf-8")
    save_sd_diffusers_folder(build_tiny_sd("sd1", seed=0), module_dir / "model")
    out = module_dir / "out"
    args = ["train", f"--pretrained_model_name_or_path={module_dir / 'model'}", "--dataset_class=user_squares.Squares",
            "--resolution=64", "--enable_bucket", "--min_bucket_reso=64", "--max_bucket_reso=128",
            "--bucket_reso_steps=64", f"--output_dir={out}", "--output_name=tiny", "--network_module=networks.lora",
            "--network_dim=4", "--max_train_steps=1", "--max_data_loader_n_workers=0", "--cache_latents"]
    assert main(args) == 0
    assert (out / "tiny.safetensors").is_file()
    listed = json.loads((out / "dataset_class" / "user_squares.Squares" / "metadata.json").read_text())
    assert sorted(v["caption"] for v in listed.values()) == ["a blue bar", "a green bar", "a red square"]
    written = sorted(Path(p).name for p in listed)
    assert written == ["000000.png", "000001.png", "on_disk.png"]  # pictures written, paths used where they are
    assert Image.open(out / "dataset_class" / "user_squares.Squares" / "000001.png").size == (128, 64)


def test_examples_that_break_the_protocol_are_named_together(module_dir):
    (module_dir / "user_broken.py").write_text(BAD_CLASS, encoding="utf-8")
    options = SimpleNamespace(dataset_class="user_broken.Broken", output_dir=str(module_dir / "out"))
    with pytest.raises(DataError) as error:
        dataset_class_metadata(options)
    message = str(error.value)
    assert message.startswith("--dataset_class user_broken.Broken: 3 example(s) do not follow the protocol")
    assert "dataset[1]: the mapping has no 'caption'" in message
    assert "dataset[2]: the image file no_such_file.png does not exist" in message
    assert "dataset[3]: the caption is int, not text" in message


def test_a_missing_module_or_class_is_named(module_dir):
    (module_dir / "user_squares.py").write_text(GOOD_CLASS, encoding="utf-8")
    out = str(module_dir / "out")
    with pytest.raises(ConfigError, match="--dataset_class no_such_module.X: no module 'no_such_module'"):
        dataset_class_metadata(SimpleNamespace(dataset_class="no_such_module.X", output_dir=out))
    with pytest.raises(ConfigError, match="user_squares has no class Square; did you mean Squares"):
        dataset_class_metadata(SimpleNamespace(dataset_class="user_squares.Square", output_dir=out))
    with pytest.raises(DataError, match=r"user_squares.Squares\(options\) failed \(AttributeError"):
        dataset_class_metadata(SimpleNamespace(dataset_class="user_squares.Squares", output_dir=out))


def test_other_data_options_are_ignored_with_a_warning():
    from lorakit.config import parse_train_args

    cfg, warnings = parse_train_args(["--pretrained_model_name_or_path=m.safetensors", "--dataset_class=my_data.Squares",
                                      "--train_data_dir=data", "--in_json=meta.json", "--resolution=64",
                                      "--output_dir=out"])
    assert cfg.dataset_class == "my_data.Squares"
    assert "--dataset_class is given, so --train_data_dir, --in_json are ignored" in warnings
    # without any data option the class alone is enough
    parse_train_args(["--pretrained_model_name_or_path=m.safetensors", "--dataset_class=my_data.Squares",
                      "--resolution=64", "--output_dir=out"])


def test_a_dry_run_leaves_nothing_in_the_output_folder(module_dir, capsys):
    (module_dir / "user_squares.py").write_text(GOOD_CLASS, encoding="utf-8")
    save_sd_diffusers_folder(build_tiny_sd("sd1", seed=0), module_dir / "model")
    out = module_dir / "out"
    args = ["train", f"--pretrained_model_name_or_path={module_dir / 'model'}", "--dataset_class=user_squares.Squares",
            "--resolution=64", f"--output_dir={out}", "--network_module=networks.lora", "--dry_run"]
    assert main(args) == 0
    plan = capsys.readouterr().out
    assert "Images: 3 training" in plan
    scratch = Path(re.search(r"(\S+lorakit-dataset-class-\S+)/user_squares\.Squares/metadata\.json", plan).group(1))
    assert not (out / "dataset_class").exists()
    assert scratch.is_dir(), "the scratch folder lives until the process ends (atexit removes it)"
