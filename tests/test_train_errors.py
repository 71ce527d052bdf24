"""User mistakes end with a short message naming the culprit: exit status 2, no traceback, no output file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_dreambooth_folder, write_tiny_checkpoints
from lorakit.cli.main import main


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("models"), "sd1")["safetensors"]


def args_for(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", "--resolution=64",
        f"--output_dir={out}", "--network_module=networks.lora", "--max_train_steps=1", "--max_data_loader_n_workers=0", *extra,
    ]


def assert_clean_failure(capsys, argv: list[str], *expected: str, out: Path) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    assert not out.exists() or not any(out.iterdir()), "no output file may be left behind"
    return err


def test_bad_options_are_reported_together(capsys, model, tmp_path):
    data = write_dreambooth_folder(tmp_path / "data")
    argv = args_for(model, data, tmp_path / "out", "--network_dimm=8", "--learning_rate=fast", "--network_train_unet_only", "--network_train_text_encoder_only")
    assert_clean_failure(capsys, argv, "--network_dimm", "did you mean --network_dim", "--learning_rate", "network_train_text_encoder_only", out=tmp_path / "out")


def test_missing_data_folder(capsys, model, tmp_path):
    assert_clean_failure(capsys, args_for(model, tmp_path / "nowhere", tmp_path / "out"), str(tmp_path / "nowhere"), out=tmp_path / "out")


def test_empty_data_folder(capsys, model, tmp_path):
    (tmp_path / "data").mkdir()
    assert_clean_failure(capsys, args_for(model, tmp_path / "data", tmp_path / "out"), str(tmp_path / "data"), out=tmp_path / "out")


def test_unreadable_image(capsys, model, tmp_path):
    data = write_dreambooth_folder(tmp_path / "data")
    broken = next((data / "2_sks toy").glob("*.png"))
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    assert_clean_failure(capsys, args_for(model, data, tmp_path / "out"), broken.name, out=tmp_path / "out")


def test_truncated_checkpoint(capsys, model, tmp_path):
    data = write_dreambooth_folder(tmp_path / "data")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    assert_clean_failure(capsys, args_for(truncated, data, tmp_path / "out"), "cut.safetensors", out=tmp_path / "out")


def test_command_line_error_has_no_traceback(tmp_path):
    """The installed entry point, in a fresh process: status 2 and a message on stderr only."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", "--network_dim=0", f"--output_dir={tmp_path}"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--network_dim: must be >= 1" in proc.stderr


def test_independent_mistakes_are_reported_together(capsys, tmp_path):
    """A missing model, a missing data folder, a bad value, a missing prompts file and an unknown optimizer are
    found in one attempt, not one per attempt."""
    argv = args_for(tmp_path / "no_model.safetensors", tmp_path / "no_data", tmp_path / "out", "--learning_rate=fast",
                    f"--sample_prompts={tmp_path / 'no_prompts.txt'}", "--optimizer_type=AdamW9bit")
    err = assert_clean_failure(capsys, argv, "5 problems", "no_model.safetensors", "no_data", "--learning_rate",
                               "no_prompts.txt", "--optimizer_type AdamW9bit", out=tmp_path / "out")
    assert err.count("\n  - ") == 5, err


def test_optimizer_scheduler_network_and_family_mistakes_come_before_the_model_loads(capsys, model, tmp_path, monkeypatch):
    from lorakit.families.registry import get_family

    def must_not_load(*_args, **_kwargs):
        raise AssertionError("the model was loaded although the options were wrong")

    monkeypatch.setattr(type(get_family("sd")), "load", must_not_load)
    data = write_dreambooth_folder(tmp_path / "data")
    argv = args_for(model, data, tmp_path / "out", "--optimizer_args", "betas=(0.9,0.99)", "weight_decay=-1",
                    "--lr_scheduler=cosine", "--lr_scheduler_args", "num_cycle=2", "--network_args", "conv_dim=four",
                    "--bucket_reso_steps=32")
    err = assert_clean_failure(capsys, argv, "--optimizer_type AdamW with --optimizer_args", "weight_decay",
                               "--lr_scheduler_args num_cycle", "conv_dim", "--bucket_reso_steps must be a multiple of 64",
                               out=tmp_path / "out")
    assert err.count("\n  - ") == 4, err


def test_options_that_are_right_still_train_after_the_checks(model, tmp_path):
    """The checks build the optimizer and schedule on a probe: a valid set of options must pass them unchanged."""
    data = write_dreambooth_folder(tmp_path / "data")
    argv = args_for(model, data, tmp_path / "out", "--optimizer_args", "betas=(0.9,0.99)", "weight_decay=0.01",
                    "--lr_scheduler=cosine_with_restarts", "--lr_scheduler_args", "num_cycles=2", "--dry_run")
    assert main(argv) == 0


def test_a_bucket_minimum_below_one_step_is_an_error_and_the_plan_shows_the_limits_in_use(capsys, model, tmp_path):
    data = write_dreambooth_folder(tmp_path / "data")
    bucketed = ("--enable_bucket", "--max_bucket_reso=100")
    argv = args_for(model, data, tmp_path / "out", *bucketed, "--min_bucket_reso=10")
    assert_clean_failure(capsys, argv, "min_bucket_reso 10 is below bucket_reso_steps 64", out=tmp_path / "out")
    assert main(args_for(model, data, tmp_path / "out", *bucketed, "--min_bucket_reso=64", "--dry_run")) == 0
    assert "buckets 64-128, steps 64" in capsys.readouterr().out, "max_bucket_reso 100 is rounded up to 128"


def test_a_resolution_outside_the_bucket_range_is_one_problem_with_the_rounded_limits(capsys, model, tmp_path):
    data = write_dreambooth_folder(tmp_path / "data")
    argv = args_for(model, data, tmp_path / "out", "--enable_bucket", "--min_bucket_reso=200", "--max_bucket_reso=300")
    err = assert_clean_failure(capsys, argv, "resolution 64x64 must lie within the bucket range",
                               out=tmp_path / "out")
    assert "1 problem in the options" in err, "the option rules and the dataset must not both report it"
