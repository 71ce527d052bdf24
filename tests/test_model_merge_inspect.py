"""`lorakit model merge` (sd-scripts' merge_models.py) equals the weighted sum exactly; `lorakit model inspect`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.cli.main import main as cli
from lorakit.families.registry import fixtures, get_family


@pytest.fixture(scope="module")
def three_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    sd = fixtures("sd")
    paths = []
    for seed in (1, 2, 3):
        path = root / f"m{seed}.safetensors"
        get_family("sd").save_single_file(sd.build_tiny_sd("sd1", seed=seed), path, "safetensors")
        paths.append(path)
    return paths


def test_merge_is_the_weighted_sum(three_models, tmp_path):
    out = tmp_path / "merged.safetensors"
    assert cli(["model", "merge", "--models", *map(str, three_models), "--ratios", "0.5", "0.3", "0.2", "--output", str(out)]) == 0
    states = [load_file(p) for p in three_models]
    merged = load_file(out)
    assert set(merged) == set(states[0])
    for key, value in merged.items():
        if value.is_floating_point():
            expected = 0.5 * states[0][key].float() + 0.3 * states[1][key].float() + 0.2 * states[2][key].float()
            assert torch.equal(value, expected), key
        else:
            assert torch.equal(value, states[0][key]), key
    # the merged file is still a model lorakit (and its metadata) reads
    assert cli(["model", "convert", str(out), str(tmp_path / "folder")]) == 0


def test_unet_only_half_precision_and_default_ratios(three_models, tmp_path):
    out = tmp_path / "unet_only"
    assert cli(["model", "merge", "--models", *map(str, three_models[:2]), "--unet_only", "--precision", "fp16",
                "--saving_precision", "bf16", "--output", str(out)]) == 0
    merged = load_file(tmp_path / "unet_only.safetensors")
    a, b = (load_file(p) for p in three_models[:2])
    for key, value in merged.items():
        if not value.is_floating_point():
            continue
        assert value.dtype == torch.bfloat16
        if key.startswith("model.diffusion_model."):
            assert torch.equal(value, (0.5 * a[key].half() + 0.5 * b[key].half()).bfloat16()), key
        else:
            assert torch.equal(value, a[key].bfloat16()), key  # the first model's, cast once


def test_skipped_and_missing_keys(three_models, tmp_path, caplog):
    extra = load_file(three_models[1])
    extra["model.diffusion_model.extra.weight"] = torch.ones(2)
    missing_key = next(k for k in extra if k.startswith("first_stage_model."))
    del extra[missing_key]
    save_file(extra, tmp_path / "odd.safetensors")
    out = tmp_path / "out.safetensors"
    with caplog.at_level("INFO", logger="lorakit.tools"):
        assert cli(["model", "merge", "--models", str(three_models[0]), str(tmp_path / "odd.safetensors"), "--show_skipped",
                    "--output", str(out)]) == 0
    assert "Skip: model.diffusion_model.extra.weight" in caplog.text
    merged, first = load_file(out), load_file(three_models[0])
    assert torch.equal(merged[missing_key], 0.5 * first[missing_key] + 0.5 * first[missing_key])


def test_merge_refusals(three_models, tmp_path, capsys):
    code = cli(["model", "merge", "--models", str(three_models[0]), "x.ckpt", "--ratios", "1", "--output", str(three_models[0])])
    err = capsys.readouterr().err
    assert code == 2
    for fragment in ("only .safetensors", "--ratios: 1 values for 2 models", "refusing to overwrite"):
        assert fragment in err


def test_inspect(three_models, tmp_path, capsys):
    assert cli(["model", "inspect", str(three_models[0])]) == 0
    text = capsys.readouterr().out
    assert "SD 1.x/2.x" in text and "single file" in text and "model.diffusion_model" in text and "F32" in text
    assert cli(["model", "inspect", "--model", str(three_models[0]), "--metadata_only"]) == 0
    metadata = json.loads(capsys.readouterr().out)
    assert "lorakit.configs" in metadata
    fixtures("sdxl").save_sdxl_diffusers_folder(fixtures("sdxl").build_tiny_sdxl(seed=0), tmp_path / "xl")
    assert cli(["model", "inspect", str(tmp_path / "xl"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "sdxl" and report["recognised"] and "StableDiffusionXLPipeline" in report["layout"]
    assert {"unet", "vae", "text_encoder", "text_encoder_2"} <= set(report["parts"])
    assert report["parameters"] == sum(report["dtypes"].values())
