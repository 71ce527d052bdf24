"""Every `lorakit` command line in README.md and docs/*.md, so the docs cannot drift from what lorakit does.

The command lines are read from the fenced blocks of the docs (continuation lines joined, the launcher —
`accelerate launch ... -m`, `python -m` — dropped). Each one is either

* **run** (`RUN`) in a folder where the files it names exist under the names it uses, made from tiny SD 1.5
  models, with only the sizes made small (resolution, steps, epochs, image size); `...` in a shortened command
  stands for the options a training run needs and the line does not give; or
* **parsed**: a training command through the option parser and its checks (every option known, every value
  valid, every cross-option rule), any other command run where the files it names do not exist, which must end
  with the error naming a missing file (the tools check their options before they read a file) rather than an
  option error.

Every line is in `RUN` or in `PARSED_ONLY` with the reason it is not run (a model of another family, whose
tiny-model runs are that family's tests; a model from the hub; an upload), and `COUNTS` pins the number of lines
per doc, so a new or changed doc line fails the test until it is listed in one of them. A run that must stop
(`STOPS`: DeepSpeed without the package) is checked for the message the doc promises.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import textwrap
from functools import lru_cache
from pathlib import Path

import pytest

from helpers import lora_options, random_network, write_dreambooth_folder
from lorakit.cli.main import main
from lorakit.config import parse_train_args

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
PYTHON_FENCE = re.compile(r"^[ \t]*```python\n(.*?)^[ \t]*```", re.S | re.M)
START = re.compile(r"\s*(lorakit\s|accelerate\s.*-m lorakit\s|python -m lorakit\s)")
TRAINING = ("train", "finetune", "dreambooth", "controlnet", "textual-inversion", "cache")

#: command lines per doc (a new line must be added here: run it, or leave it to the parse check)
COUNTS = {
    "README.md": 4, "docs/controlnet.md": 3, "docs/datasets.md": 12, "docs/families-qwen-zimage.md": 3,
    "docs/families.md": 11, "docs/finetune.md": 5, "docs/flux.md": 1, "docs/generate.md": 12, "docs/memory.md": 12, "docs/models.md": 14,
    "docs/multi_gpu.md": 4, "docs/optimizers.md": 2, "docs/sample.md": 5, "docs/sd3.md": 2, "docs/sdxl.md": 2,
    "docs/textual_inversion.md": 1, "docs/tools.md": 25, "docs/training.md": 3,
}

# the files a run needs, by the name the doc gives them -> what to put there
SD1, SD1_FOLDER, SD2V_CKPT, LORA, IMAGES, DATASET_TOML, PROMPTS, PNG, MASK, EMBEDDING = (
    "sd1", "sd1_folder", "sd2v_ckpt", "lora", "images", "dataset_toml", "prompts", "png", "mask", "embedding")
TRAIN_IMAGES = {"train": IMAGES}

#: (doc, index of the command line in it) -> the files it names
RUN: dict[tuple[str, int], dict[str, str]] = {
    ("README.md", 0): {"model.safetensors": SD1, **TRAIN_IMAGES},
    ("README.md", 1): {"model.safetensors": SD1, **TRAIN_IMAGES},
    ("README.md", 2): {"model.safetensors": SD1, **TRAIN_IMAGES},
    ("README.md", 3): {"../models/model.ckpt": "sd1_ckpt", "../data/db/char1": IMAGES, "../data/db/reg1": IMAGES},
    ("docs/datasets.md", 0): {"model.safetensors": SD1, **TRAIN_IMAGES},
    ("docs/datasets.md", 5): {"imgs": "flat_images"},
    ("docs/datasets.md", 6): {"imgs": "flat_images"},
    ("docs/datasets.md", 7): {"meta.json": "meta_json"},
    ("docs/datasets.md", 8): {"model.safetensors": SD1, "imgs": "flat_images", "meta_clean.json": "meta_json"},
    ("docs/datasets.md", 11): {"model.safetensors": SD1, "my_data.py": "doc_python"},
    ("docs/controlnet.md", 0): {"sd15.safetensors": SD1, "images": "flat_images", "canny": "flat_images",
                                "prompts.txt": PROMPTS},
    ("docs/families.md", 0): {"v1-5-pruned.safetensors": SD1, "dataset.toml": DATASET_TOML},
    ("docs/finetune.md", 3): {"v1-5-pruned.safetensors": SD1, "images": "flat_images", "meta_lat.json": "meta_json"},
    ("docs/finetune.md", 4): {"v1-5-pruned.safetensors": SD1, "train": IMAGES, "reg": IMAGES},
    ("docs/generate.md", 0): {"model.safetensors": SD1, "my_lora.safetensors": LORA},
    ("docs/generate.md", 3): {"model.safetensors": SD1, "sksstyle.safetensors": EMBEDDING},
    ("docs/generate.md", 4): {"model.safetensors": SD1, "init.png": PNG},
    ("docs/generate.md", 5): {"model.safetensors": SD1, "photo.png": PNG, "mask.png": MASK},
    ("docs/models.md", 0): {"path/to/sd15_diffusers": SD1_FOLDER},
    ("docs/models.md", 1): {"sd15.safetensors": SD1, "path/to": "folder"},  # the line above's folder
    ("docs/models.md", 2): {"sd21_768v.ckpt": SD2V_CKPT},
    ("docs/models.md", 9): {"a.safetensors": SD1, "b.safetensors": SD1, "c.safetensors": SD1},
    ("docs/models.md", 10): {"a.safetensors": SD1, "b.safetensors": "sd1_tuned"},
    ("docs/models.md", 12): {"path/to/diffusers_folder": SD1_FOLDER},
    ("docs/models.md", 13): {"model.safetensors": SD1},
    ("docs/optimizers.md", 0): {"model.safetensors": SD1, "train": "images10"},  # 10% of 10 images held out
    ("docs/multi_gpu.md", 0): {"my_lora.toml": "my_lora_toml", **TRAIN_IMAGES, "model.safetensors": SD1},
    ("docs/multi_gpu.md", 2): {"my_lora.toml": "my_lora_toml", **TRAIN_IMAGES, "model.safetensors": SD1},
    ("docs/optimizers.md", 1): {"model.safetensors": SD1, **TRAIN_IMAGES, "my_optimizers/sign_sgd.py": "python_block_0"},
    ("docs/sd3.md", 1): {"sd3.5_medium.safetensors": "sd35m", "my_sd3_dataset_config.toml": DATASET_TOML},
    ("docs/sample.md", 1): {"model.safetensors": SD1, "style.safetensors": LORA, "character.safetensors": LORA},
    ("docs/sample.md", 3): {"model.safetensors": SD1, "style.safetensors": LORA, "character.safetensors": LORA},
    ("docs/textual_inversion.md", 0): {"model.safetensors": SD1, "data": IMAGES, "prompts.txt": PROMPTS},
    ("docs/tools.md", 0): {"my_lora.safetensors": LORA},
    ("docs/tools.md", 1): {"my_lora.safetensors": LORA},
    ("docs/tools.md", 2): {"model.safetensors": SD1, "char.safetensors": LORA, "style.safetensors": LORA},
    ("docs/tools.md", 3): {"sd15_diffusers": SD1_FOLDER, "char.safetensors": LORA},
    ("docs/tools.md", 7): {"a.safetensors": LORA, "b.safetensors": LORA},
    ("docs/tools.md", 8): {"a.safetensors": LORA, "b.safetensors": LORA},
    ("docs/tools.md", 9): {"a.safetensors": LORA, "b.safetensors": LORA},
    ("docs/tools.md", 10): {"base.safetensors": SD1, "dreambooth.safetensors": "sd1_tuned"},
    ("docs/tools.md", 13): {"my_lora.safetensors": LORA},
    ("docs/tools.md", 14): {"peft_lora.safetensors": "peft_lora"},
    ("docs/tools.md", 18): {"my_lora.safetensors": LORA},
    ("docs/tools.md", 19): {"a.safetensors": LORA, "b.safetensors": LORA},
    ("docs/tools.md", 20): {"char.safetensors": LORA, "style.safetensors": LORA},
    ("docs/tools.md", 21): {"dylora.safetensors": "dylora"},
    ("docs/tools.md", 22): {"dylora.safetensors": "dylora"},
    ("docs/tools.md", 23): {"model.safetensors": SD1, "lora.safetensors": LORA},
    ("docs/tools.md", 24): {"model.safetensors": SD1, "lora.safetensors": LORA},
    ("docs/training.md", 2): {"model.safetensors": SD1, "train": "images10"},
    ("docs/memory.md", 6): {"model.safetensors": SD1, **TRAIN_IMAGES},  # --vram_budget 12GB --dry_run
    ("docs/memory.md", 7): {"model.safetensors": SD1, **TRAIN_IMAGES},  # --vram_budget 12GB
}

#: runs that must stop with this message (here, without the package the doc says the line needs)
STOPS = {("docs/multi_gpu.md", 2): "pip install deepspeed"}

# why a line is only parsed
FAMILY = "a {} model: the family's tiny-model runs are its own tests' ({})"
HUB = "needs a tagger or captioning model from the model hub"
CONTROLNET_FILES = "ControlNet files made by the ControlNet trainer's save code: the runs are test_generate_controlnet.py's"
PROCESSES = "the same run as line 0 once the launcher is dropped; several processes: tests/test_distributed.py"
UPLOAD = "uploads to the model hub (unreachable here): tests/test_hub.py"
COMPILE = "compiling takes minutes on a CPU: test_compile.py compares compiled and eager losses on tiny models"
BUDGET = "the budget of the GPU the run is on (auto needs a GPU): test_memory_plan.py"
REAL_SIZE = "a benchmark of a real-size model (many GiB): test_bench.py runs a tiny one"
#: (doc, index) -> why the line is parsed rather than run
PARSED_ONLY: dict[tuple[str, int], str] = {
    ("docs/controlnet.md", 1): FAMILY.format("SDXL", "test_controlnet.py"),
    ("docs/controlnet.md", 2): FAMILY.format("FLUX.1", "test_controlnet.py"),
    ("docs/datasets.md", 1): HUB, ("docs/datasets.md", 2): HUB, ("docs/datasets.md", 3): HUB,
    ("docs/datasets.md", 4): HUB,
    ("docs/datasets.md", 9): FAMILY.format("FLUX.1", "test_cache_command.py"),
    ("docs/datasets.md", 10): FAMILY.format("FLUX.1", "test_flux_train.py"),
    ("docs/families-qwen-zimage.md", 0): FAMILY.format("Z-Image", "test_z_image_family.py"),
    ("docs/families-qwen-zimage.md", 1): FAMILY.format("Qwen-Image", "test_qwen_image_family.py"),
    ("docs/families-qwen-zimage.md", 2): FAMILY.format("Z-Image", "test_z_image_family.py"),
    ("docs/families.md", 1): FAMILY.format("SDXL", "test_sdxl_train.py"),
    ("docs/families.md", 2): FAMILY.format("SD 3.5", "test_sd3_train.py, test_sd3_seed.py"),
    ("docs/families.md", 3): FAMILY.format("FLUX.1", "test_flux_train.py"),
    ("docs/families.md", 4): FAMILY.format("Chroma", "test_chroma_family.py"),
    ("docs/families.md", 5): FAMILY.format("FLUX.2", "test_flux2_family.py"),
    ("docs/families.md", 6): FAMILY.format("Qwen-Image", "test_qwen_image_family.py"),
    ("docs/families.md", 7): FAMILY.format("Z-Image", "test_z_image_family.py"),
    ("docs/families.md", 8): FAMILY.format("Z-Image", "test_z_image_family.py"),
    ("docs/families.md", 9): FAMILY.format("Qwen-Image", "test_qwen_image_family.py"),
    ("docs/families.md", 10): FAMILY.format("Z-Image", "test_z_image_family.py"),
    ("docs/finetune.md", 0): FAMILY.format("FLUX.1", "test_finetune.py"),
    ("docs/finetune.md", 1): FAMILY.format("SDXL", "test_finetune.py"),
    ("docs/finetune.md", 2): FAMILY.format("SD 3.5", "test_finetune.py"),
    ("docs/flux.md", 0): FAMILY.format("FLUX.1", "test_flux_train.py"),
    ("docs/generate.md", 1): FAMILY.format("FLUX.1", "test_generate.py"),
    ("docs/generate.md", 2): FAMILY.format("SDXL", "test_generate.py"),
    ("docs/generate.md", 6): FAMILY.format("SDXL", "test_generate.py"),
    ("docs/generate.md", 7): CONTROLNET_FILES, ("docs/generate.md", 8): CONTROLNET_FILES,
    ("docs/generate.md", 9): FAMILY.format("SDXL", "test_generate_controlnet.py"),
    ("docs/generate.md", 10): FAMILY.format("FLUX.1", "test_generate_controlnet.py"),
    ("docs/generate.md", 11): FAMILY.format("FLUX.1", "test_sample_options.py"),
    ("docs/models.md", 3): FAMILY.format("SDXL", "test_model_convert.py"),
    ("docs/models.md", 4): FAMILY.format("SD3", "test_model_convert.py"),
    ("docs/models.md", 5): FAMILY.format("SD3", "test_model_convert.py"),
    ("docs/models.md", 6): FAMILY.format("SD 3.5", "test_model_convert.py"),
    ("docs/models.md", 7): FAMILY.format("FLUX.1", "test_model_convert.py"),
    ("docs/models.md", 8): FAMILY.format("FLUX.1", "test_model_convert.py"),
    ("docs/models.md", 11): FAMILY.format("SDXL", "test_model_merge_inspect.py"),
    ("docs/multi_gpu.md", 1): PROCESSES, ("docs/multi_gpu.md", 3): PROCESSES,
    ("docs/sample.md", 0): FAMILY.format("FLUX.1", "test_generate.py, test_sample_command.py"),
    ("docs/sample.md", 2): FAMILY.format("SDXL", "test_sample_command.py"),
    ("docs/sample.md", 4): FAMILY.format("SD3", "test_sample_options.py"),
    ("docs/sd3.md", 0): FAMILY.format("SD 3.5 Large", "test_sd3_seed.py runs this guide command"),
    ("docs/sdxl.md", 0): FAMILY.format("SDXL", "test_sdxl_train.py"),
    ("docs/sdxl.md", 1): FAMILY.format("SDXL", "test_sdxl_train.py"),
    ("docs/tools.md", 4): FAMILY.format("SDXL", "test_tools_families.py"),
    ("docs/tools.md", 5): FAMILY.format("SD 3.5", "test_tools_families.py"),
    ("docs/tools.md", 6): FAMILY.format("FLUX.1", "test_tools_families.py"),
    ("docs/tools.md", 11): FAMILY.format("SDXL", "test_tools_families.py"),
    ("docs/tools.md", 12): FAMILY.format("FLUX.1", "test_tools_families.py"),
    ("docs/tools.md", 15): FAMILY.format("FLUX.1", "test_tools_families.py"),
    ("docs/tools.md", 16): FAMILY.format("SD3", "test_tools_families.py"),
    ("docs/tools.md", 17): FAMILY.format("FLUX.1", "test_model_convert.py"),
    ("docs/training.md", 0): UPLOAD, ("docs/training.md", 1): UPLOAD,
    ("docs/memory.md", 0): FAMILY.format("FLUX.1", "test_base_quant.py"),
    ("docs/memory.md", 1): FAMILY.format("FLUX.1", "test_base_quant.py"),
    ("docs/memory.md", 2): FAMILY.format("FLUX.1", "test_base_quant.py"),
    ("docs/memory.md", 3): FAMILY.format("FLUX.1", "test_base_quant.py"),
    ("docs/memory.md", 4): COMPILE, ("docs/memory.md", 5): COMPILE,
    ("docs/memory.md", 8): BUDGET,
    ("docs/memory.md", 9): REAL_SIZE, ("docs/memory.md", 10): REAL_SIZE, ("docs/memory.md", 11): REAL_SIZE,
}

#: what a run's file must hold where the doc promises it: (doc, index) -> (file pattern, key prefix)
EXPECTED_KEYS = {("docs/sd3.md", 1): ("out/*.safetensors", "lora_te3_"),  # train_t5xxl=True: LoRA on T5 too
                 ("docs/datasets.md", 11): ("out/squares.safetensors", "lora_unet_")}
#: the options a shortened training line (`...`) stands for, where it does not give them
SHORTENED = {"--pretrained_model_name_or_path": "model.safetensors", "--train_data_dir": "train",
             "--output_dir": "out", "--resolution": "64", "--network_module": "networks.lora"}
#: sizes made small for a run: option -> value
SIZES = {"--resolution": "64", "--max_train_steps": "1", "--max_train_epochs": "1", "--W": "64", "--H": "64",
         "--steps": "2", "--train_batch_size": "1", "--images_per_prompt": "1", "--batch_size": "1",
         "--validate_every_n_steps": "1", "--max_bucket_reso": "128", "--min_bucket_reso": "64"}
#: image sizes and steps of the inference commands, given where a line leaves them to the defaults (512, 30)
INFERENCE_SIZES = {"generate": {"--W": "64", "--H": "64", "--steps": "2"},
                   "sample": {"--width": "64", "--height": "64", "--steps": "2"}}
#: the parse check for a training line: the placeholders filled in
PARSE_FILL = {"...": [], "<the": [], "same": [], "options>": []}


def doc_commands() -> dict[str, list[list[str]]]:
    """doc -> its `lorakit` command lines, as argument lists after `lorakit`."""
    found: dict[str, list[list[str]]] = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = []
        for block in FENCE.findall(path.read_text(encoding="utf-8")):
            for line in re.sub(r"\\\n", " ", block).splitlines():
                if START.match(line):
                    words = shlex.split(line, comments=True)
                    lines.append(words[words.index("lorakit") + 1:])
        if lines:
            found[path.relative_to(ROOT).as_posix()] = lines
    return found


def every_command() -> list[tuple[str, int, list[str]]]:
    return [(doc, index, words) for doc, lines in doc_commands().items() for index, words in enumerate(lines)]


def test_every_doc_command_is_listed():
    """Each line is run or parsed for a stated reason: a new line must be added to one of the two."""
    assert {doc: len(lines) for doc, lines in doc_commands().items()} == COUNTS
    lines = {(doc, index) for doc, index, _ in every_command()}
    assert not set(RUN) & set(PARSED_ONLY)
    assert set(RUN) | set(PARSED_ONLY) == lines
    named = {name for reason in PARSED_ONLY.values() for name in re.findall(r"test_\w+\.py", reason)}
    assert all((ROOT / "tests" / name).is_file() for name in named), named


# ------------------------------------------------------------------------------------------------ parsing


def option_names(words: list[str]) -> set[str]:
    return {w.partition("=")[0] for w in words if w.startswith("--")}


def filled(words: list[str]) -> list[str]:
    """A shortened line with `...` (or `<the same options>`) given the options a run needs."""
    if not any(w in PARSE_FILL for w in words):
        return words
    given = option_names(words)
    extra = [f"{k}={v}" for k, v in SHORTENED.items() if k not in given]
    return [w for w in words if w not in PARSE_FILL] + extra


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    """docs/multi_gpu.md's `--config_file my_lora.toml`: a file of options, as `--output_config` writes them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_lora.toml").write_text(
        'pretrained_model_name_or_path = "model.safetensors"\ntrain_data_dir = "train"\noutput_dir = "out"\n'
        'resolution = "512"\nnetwork_module = "networks.lora"\n', encoding="utf-8")


@pytest.mark.parametrize(("doc", "index", "words"), [c for c in every_command() if c[2][0] in TRAINING],
                         ids=lambda v: v if isinstance(v, (str, int)) else "")
def test_training_lines_parse(doc, index, words, config_file):
    command, argv = words[0], filled(words[1:])
    if command == "cache":
        from lorakit.cli.cache import parse_cache_options

        parse_cache_options(argv)
    else:
        parse_train_args(argv, command=command)


OPTION_ERRORS = ("unrecognized arguments", "invalid choice", "the following arguments are required",
                 "expected one argument", "not available", "not implemented", "invalid ")


@pytest.mark.parametrize(("doc", "index", "words"), [c for c in every_command() if c[2][0] not in TRAINING],
                         ids=lambda v: v if isinstance(v, (str, int)) else "")
def test_tool_lines_parse(doc, index, words, tmp_path, monkeypatch, capsys):
    """Run where none of the files exist: the options pass their checks and the error names a missing file."""
    monkeypatch.chdir(tmp_path)
    if words[0] == "bench":  # it builds its models from shapes: no file to miss, so stop it once its options pass
        _bench_options_pass(words[1:], monkeypatch)
        return
    assert main(words) == 2
    error = capsys.readouterr().err
    assert not any(text in error for text in OPTION_ERRORS), error
    named = [w for w in words[1:] if not w.startswith("-") and len(w) > 2 and w.rstrip("/") in error]
    assert named, error


def _bench_options_pass(argv: list[str], monkeypatch) -> None:
    import lorakit.bench

    class OptionsPassed(Exception):
        pass

    def stop(*args, **kwargs):
        raise OptionsPassed

    monkeypatch.setattr(lorakit.bench, "run", stop)
    with pytest.raises(OptionsPassed):
        lorakit.bench.main(argv)


# ------------------------------------------------------------------------------------------------ running


@lru_cache(maxsize=1)
def _store() -> Path:
    """Tiny models and files, made once per test session."""
    import tempfile

    import torch

    from lorakit.adapters.formats import save_lora_file
    from lorakit.families.common.ldm_keys import save_sd_single_file
    from lorakit.families.registry import get_family
    from lorakit.families.sd.tiny import build_tiny_sd, save_sd_diffusers_folder
    from PIL import Image

    root = Path(tempfile.mkdtemp(prefix="lorakit-docs-"))
    comps = build_tiny_sd("sd1", seed=0)
    save_sd_single_file(comps, root / "sd1.safetensors", fmt="safetensors")
    save_sd_diffusers_folder(comps, root / "sd1_folder")
    save_sd_single_file(comps, root / "sd1.ckpt", fmt="ckpt")
    save_sd_single_file(build_tiny_sd("sd2v", seed=0), root / "sd2v.ckpt", fmt="ckpt")
    network = random_network(get_family("sd"), comps, lora_options(conv=False), seed=1)
    save_lora_file(network.state_dict_kohya(), root / "lora.safetensors", {"ss_network_module": "networks.lora"})
    with torch.no_grad():
        for p in comps.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_sd_single_file(comps, root / "sd1_tuned.safetensors", fmt="safetensors")
    write_dreambooth_folder(root / "images", count=2, repeats=1)
    write_dreambooth_folder(root / "images10", count=10, size=32, repeats=1)
    width = comps.text_encoders[0].config.hidden_size
    from safetensors.torch import save_file

    save_file({"emb_params": torch.randn(2, width) * 0.01}, str(root / "embedding.safetensors"))
    flat = root / "flat_images"
    shutil.copytree(root / "images" / "1_sks toy", flat)
    for caption in flat.glob("*.caption"):
        caption.with_suffix(".txt").write_text("toy, red_square, 1girl", encoding="utf-8")
    (root / "meta.json").write_text(json.dumps({c.stem: {"caption": c.read_text(encoding="utf-8"), "tags": "red_square"}
                                                for c in flat.glob("*.caption")}), encoding="utf-8")
    assert main(["lora", "convert", "--model", str(root / "lora.safetensors"), "--save_to",
                 str(root / "peft_lora.safetensors"), "--to", "diffusers"]) == 0
    assert main(["train", f"--pretrained_model_name_or_path={root / 'sd1_folder'}",
                 f"--train_data_dir={root / 'images'}", "--resolution=64", f"--output_dir={root / 'dylora'}",
                 "--output_name=dylora", "--network_module=networks.dylora", "--network_dim=8",
                 "--network_args", "unit=4", "--max_train_steps=1", "--max_data_loader_n_workers=0"]) == 0
    Image.new("RGB", (64, 64), (120, 40, 200)).save(root / "png.png")
    Image.new("L", (64, 64), 255).save(root / "mask.png")
    return root


def place(cwd: Path, name: str, kind: str, doc: str) -> None:
    store, target = _store(), (cwd / name).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if kind in (SD1, LORA, EMBEDDING, "sd1_tuned"):
        shutil.copyfile(store / {SD1: "sd1.safetensors", LORA: "lora.safetensors", EMBEDDING: "embedding.safetensors",
                                 "sd1_tuned": "sd1_tuned.safetensors"}[kind], target)
    elif kind == SD1_FOLDER:
        shutil.copytree(store / "sd1_folder", target)
    elif kind in (SD2V_CKPT, "sd1_ckpt"):
        shutil.copyfile(store / ("sd2v.ckpt" if kind == SD2V_CKPT else "sd1.ckpt"), target)
    elif kind in (IMAGES, "images10", "flat_images"):
        shutil.copytree(store / kind, target)
    elif kind in ("meta_json", "peft_lora"):
        shutil.copyfile(store / {"meta_json": "meta.json", "peft_lora": "peft_lora.safetensors"}[kind], target)
    elif kind in (PNG, MASK):
        shutil.copyfile(store / f"{kind}.png" if kind == MASK else store / "png.png", target)
    elif kind == "my_lora_toml":  # docs/multi_gpu.md's options file, as --output_config writes one
        target.write_text('pretrained_model_name_or_path = "model.safetensors"\ntrain_data_dir = "train"\n'
                          'output_dir = "out"\nresolution = "64"\nnetwork_module = "networks.lora"\n'
                          'max_train_steps = 1\n', encoding="utf-8")
    elif kind == "dylora":
        shutil.copyfile(store / "dylora" / "dylora.safetensors", target)
    elif kind == "folder":
        target.mkdir()
    elif kind == PROMPTS:
        target.write_text("a toy --w 64 --h 64 --s 2\n", encoding="utf-8")
    elif kind == DATASET_TOML:
        target.write_text(f"[general]\nresolution = 64\ncaption_extension = '.caption'\n[[datasets]]\n"
                          f"[[datasets.subsets]]\nimage_dir = '{store / 'images' / '1_sks toy'}'\n", encoding="utf-8")
    elif kind == "sd35m":
        from lorakit.families.sd3.tiny import build_tiny_sd3, save_sai_file

        save_sai_file(build_tiny_sd3(1, "sd3.5m"), target)
    elif kind == "doc_python" or kind.startswith("python_block_"):  # the doc's own Python block (by name or number)
        blocks = [textwrap.dedent(b) for b in PYTHON_FENCE.findall((ROOT / doc).read_text(encoding="utf-8"))]
        block = next(b for b in blocks if f"# {name}" in b) if kind == "doc_python" else blocks[int(kind.rsplit("_", 1)[1])]
        target.write_text(block, encoding="utf-8")


def sized(words: list[str]) -> list[str]:
    """The line with the sizes made small (`--opt value` and `--opt=value`)."""
    out, skip = [], False
    for i, word in enumerate(words):
        if skip:
            skip = False
            continue
        name, eq, _ = word.partition("=")
        if name in SIZES:
            out.append(f"{name}={SIZES[name]}")
            skip = not eq and i + 1 < len(words) and not words[i + 1].startswith("--")
            continue
        out.append(word)
    given = option_names(out)
    return out + [f"{k}={v}" for k, v in INFERENCE_SIZES.get(words[0], {}).items() if k not in given]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(("doc", "index"), sorted(RUN), ids=lambda v: str(v))
def test_doc_line_runs(doc, index, tmp_path, monkeypatch, capsys):
    words = doc_commands()[doc][index]
    cwd = tmp_path / "world" / "work"  # lines name files beside the working folder too (../models/model.ckpt)
    cwd.mkdir(parents=True)
    for name, kind in RUN[doc, index].items():
        place(cwd, name, kind, doc)
    monkeypatch.chdir(cwd)
    argv = sized(filled(words))
    if words[0] in TRAINING:
        argv += [] if "--max_train_steps" in option_names(argv) else ["--max_train_steps=1"]
        argv += ["--max_data_loader_n_workers=0"]
    before = set(cwd.parent.rglob("*"))
    if (doc, index) in STOPS:
        if importlib.util.find_spec("deepspeed") is not None:
            pytest.skip("deepspeed is installed: the line would start DeepSpeed, which needs GPUs")
        assert main(argv) == 2
        assert STOPS[doc, index] in capsys.readouterr().err
        return
    status = main(argv)
    assert status == 0, capsys.readouterr().err
    if "inspect" not in words[:2] and "--dry_run" not in words:  # every other command writes its result
        assert set(cwd.parent.rglob("*")) - before, f"{doc} line {index} wrote nothing"
    if (doc, index) in EXPECTED_KEYS:
        from safetensors import safe_open

        pattern, prefix = EXPECTED_KEYS[doc, index]
        files = sorted(cwd.glob(pattern))
        assert files, pattern
        with safe_open(str(files[-1]), framework="pt") as f:
            assert any(k.startswith(prefix) for k in f.keys()), prefix
