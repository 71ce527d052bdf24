"""The T5 tokenizer of SD3/FLUX single files: beside the model, in --tokenizer_cache_dir, or from the model hub;
offline (or with the hub unreachable) the error names the files, where to get them and where to put them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit.errors import CheckpointError
from lorakit.families.common.tiny_parts import bundled_tiny_t5_tokenizer
from lorakit.families.common.tokenizers import T5_CACHE_NAME, find_t5_tokenizer
from lorakit.families.flux.loading import T5_TOKENIZER_DIRS

SRC = Path(__file__).resolve().parents[1] / "src"


def lonely_t5(folder: Path) -> Path:
    folder.mkdir(parents=True)
    path = folder / "t5xxl_fp16.safetensors"
    path.write_bytes(b"")  # only its folder is looked at
    return path


def test_offline_error_names_the_files_the_source_and_the_places(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    t5 = lonely_t5(tmp_path / "models")
    with pytest.raises(CheckpointError) as error:
        find_t5_tokenizer([t5], T5_TOKENIZER_DIRS, "FLUX.1")
    message = str(error.value)
    for part in ("spiece.model", "https://huggingface.co/google/t5-v1_1-xxl", f"{tmp_path / 'models'}/",
                 f"{tmp_path / 'models' / 'tokenizer_2'}/", f"DIR/{T5_CACHE_NAME}/", "--tokenizer_cache_dir",
                 "HF_HUB_OFFLINE"):
        assert part in message, (part, message)


@pytest.mark.parametrize("layout", ["sd_scripts_cache", "folder_itself"])
def test_tokenizer_cache_dir_or_a_local_folder(tmp_path, monkeypatch, layout):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "tokenizers"
    target = cache / T5_CACHE_NAME if layout == "sd_scripts_cache" else cache
    bundled_tiny_t5_tokenizer(64).save_pretrained(str(target))
    tokenizer = find_t5_tokenizer([lonely_t5(tmp_path / "models")], T5_TOKENIZER_DIRS, "FLUX.1", cache)
    assert tokenizer("a toy").input_ids[-1] == tokenizer.eos_token_id


def test_unreachable_hub_is_said_quickly(tmp_path):
    """With the hub at an address nothing listens on, the fetch fails at once and says where it tried."""
    script = (
        "from pathlib import Path\n"
        "from lorakit.families.common.tokenizers import find_t5_tokenizer\n"
        "from lorakit.errors import CheckpointError\n"
        f"p = Path({str(tmp_path / 'models' / 't5.safetensors')!r}); p.parent.mkdir(); p.write_bytes(b'')\n"
        "try:\n    find_t5_tokenizer([p], ('', 'tokenizer_2'), 'FLUX.1')\nexcept CheckpointError as e:\n    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(SRC), HF_HUB_DOWNLOAD_TIMEOUT="5",
               HF_HUB_ETAG_TIMEOUT="5")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert "could not be reached" in done.stdout and "http://127.0.0.1:9" in done.stdout, done.stdout + done.stderr
    assert "spiece.model" in done.stdout and elapsed < 60
