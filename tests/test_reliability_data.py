"""Data that would make a run meaningless or stop it half-way is found at start-up: repeats below 1, images
that cannot be decoded; and a huge repeat count costs no memory or time."""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

import pytest

from helpers import write_dreambooth_folder, write_tiny_checkpoints
from lorakit.cli.main import main
from lorakit.config import parse_train_args
from lorakit.training.run import train


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("model"), "sd1")["safetensors"]


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", "--resolution=64",
            f"--output_dir={out}", "--network_module=networks.lora", "--max_train_steps=2", "--seed=1", *extra]


def failure(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------------------------------ repeats


def plan_cost(model: Path, root: Path, repeats: int) -> tuple[float, int, int]:
    """Seconds and peak traced bytes of a --dry_run whose train and regularisation folders repeat `repeats` times."""
    data = write_dreambooth_folder(root / f"data{repeats}", repeats=repeats)
    reg = write_dreambooth_folder(root / f"reg{repeats}", repeats=repeats, name="toy")
    cfg, _ = parse_train_args(train_args(model, data, root / "out", f"--reg_data_dir={reg}", "--dry_run"))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = train(cfg)
        return time.perf_counter() - start, tracemalloc.get_traced_memory()[1], result.plan.batches_per_epoch
    finally:
        tracemalloc.stop()


def test_a_billion_repeats_plan_as_fast_and_small_as_ten(model, tmp_path):
    plan_cost(model, tmp_path / "warm-up", 10)  # imports and first-use costs out of the comparison
    small_time, small_peak, small_batches = plan_cost(model, tmp_path, 10)
    huge_time, huge_peak, huge_batches = plan_cost(model, tmp_path, 10**9)
    assert (small_batches, huge_batches) == (80, 8 * 10**9)  # 4 images x repeats, as many regularisation
    assert huge_peak < small_peak + 1_000_000, (small_peak, huge_peak)
    assert huge_time < small_time + 2.0, (small_time, huge_time)


def test_a_billion_repeats_train_with_workers(model, tmp_path):
    data = write_dreambooth_folder(tmp_path / "data", repeats=10**9)
    result = train(parse_train_args(train_args(model, data, tmp_path / "out", "--output_name=huge"))[0])
    assert len(result.step_losses) == 2 and (tmp_path / "out" / "huge.safetensors").is_file()


def test_the_lazy_epoch_shuffle_is_a_permutation():
    from lorakit.data.epoch_order import Permutation

    for n in (1, 2, 3, 7, 64, 1000):
        shuffled = [Permutation(n, seed=5)[i] for i in range(n)]
        assert sorted(shuffled) == list(range(n))
    assert [Permutation(1000, 1)[i] for i in range(10)] != [Permutation(1000, 2)[i] for i in range(10)]


def test_repeats_below_one_stop_with_a_message(model, tmp_path, capsys):
    data = write_dreambooth_folder(tmp_path / "data", repeats=0)
    write_dreambooth_folder(data, repeats=-1, name="other")
    err = failure(capsys, ["train", *train_args(model, data, tmp_path / "out", "--dry_run")])
    assert "0_sks toy (0)" in err and "-1_other (-1)" in err and "must be 1 or more" in err
    config = tmp_path / "dataset.toml"
    config.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{data / "0_sks toy"}"\nnum_repeats = 0\n')
    err = failure(capsys, ["train", *train_args(model, data, tmp_path / "out", f"--dataset_config={config}", "--dry_run")])
    assert "num_repeats = 0 must be a whole number of at least 1" in err and str(config) in err


def test_non_finite_learning_rates_are_refused_together(model, tmp_path, capsys):
    data = write_dreambooth_folder(tmp_path / "data")
    argv = ["train", *train_args(model, data, tmp_path / "out", "--learning_rate=nan", "--unet_lr=inf",
                                 "--text_encoder_lr=-inf")]
    err = failure(capsys, argv)
    assert "3 problems" in err
    for option in ("--learning_rate", "--unet_lr", "--text_encoder_lr"):
        assert f"{option}" in err and "finite number" in err


# ------------------------------------------------------------------------------------------ bad images


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def jpeg_dataset(root: Path) -> Path:
    """Four JPEGs whose header reads fine; the last two are cut off before their end."""
    from PIL import Image

    folder = root / "2_sks toy"
    folder.mkdir(parents=True)
    for index in range(4):
        image = Image.effect_noise((64, 64), 60 + index).convert("RGB")
        image.save(folder / f"img_{index}.jpg", quality=95)
    for index in (2, 3):
        truncate(folder / f"img_{index}.jpg")
    return root


def test_truncated_jpegs_are_all_reported_at_start_up(model, tmp_path, capsys):
    data = jpeg_dataset(tmp_path / "data")
    err = failure(capsys, ["train", *train_args(model, data, tmp_path / "out")])
    assert "2 problem(s) with the training images" in err and "--skip_bad_images" in err
    assert "img_2.jpg" in err and "img_3.jpg" in err and "truncated" in err
    assert not (tmp_path / "out").exists()


def test_skip_bad_images_trains_without_them(model, tmp_path, caplog):
    data = jpeg_dataset(tmp_path / "data")
    with caplog.at_level("WARNING"):
        result = train(parse_train_args(train_args(model, data, tmp_path / "out", "--skip_bad_images"))[0])
    assert "left out 2 image(s)" in caplog.text and "img_2.jpg" in caplog.text and "img_3.jpg" in caplog.text
    assert result.plan.batches_per_epoch == 4 and len(result.step_losses) == 2  # 2 good images x 2 repeats


def test_image_checks_are_remembered_until_a_file_changes(tmp_path, monkeypatch):
    import lorakit.data.verify as verify

    data = write_dreambooth_folder(tmp_path / "data")
    paths = sorted((data / "2_sks toy").glob("*.png"))
    decoded: list[Path] = []
    real = verify.decode_check
    monkeypatch.setattr(verify, "decode_check", lambda path: (decoded.append(path), real(path))[1])
    assert verify.bad_images(paths) == {} and len(decoded) == 4
    assert verify.bad_images(paths) == {} and len(decoded) == 4, "a second start decodes nothing"
    truncate(paths[1])
    os.utime(paths[1], ns=(time.time_ns(), time.time_ns()))
    assert list(verify.bad_images(paths)) == [paths[1]] and decoded[4:] == [paths[1]]



def _prediction_warnings(caplog, argv: list[str]) -> list[str]:
    caplog.clear()
    cfg, _ = parse_train_args(argv)
    with caplog.at_level("WARNING", logger="lorakit"):
        train(cfg)
    return [r.message for r in caplog.records if "prediction_type" in r.message]


@pytest.mark.parametrize("version, flag, declared", [("sd2v", [], "v_prediction"), ("sd1", ["--v_parameterization"], "epsilon")])
def test_a_scheduler_config_that_disagrees_with_v_parameterization_is_named(tmp_path, caplog, version, flag, declared):
    """As in sd-scripts the flag decides what is trained, but a folder that says otherwise is named with its value."""
    from lorakit.families.sd.tiny import build_tiny_sd, save_sd_diffusers_folder

    save_sd_diffusers_folder(build_tiny_sd(version, seed=0), tmp_path / "model")
    argv = [f"--pretrained_model_name_or_path={tmp_path / 'model'}", "--resolution=64", "--dry_run",
            f"--train_data_dir={write_dreambooth_folder(tmp_path / 'data')}", f"--output_dir={tmp_path / 'out'}",
            "--network_module=networks.lora", *(["--v2"] if version == "sd2v" else [])]
    said = _prediction_warnings(caplog, argv + flag)
    assert len(said) == 1 and f"prediction_type={declared!r}" in said[0], said
    assert str(tmp_path / "model" / "scheduler" / "scheduler_config.json") in said[0]
    agreeing = ["--v_parameterization"] if declared == "v_prediction" else []
    assert not _prediction_warnings(caplog, argv + agreeing), "no warning when they agree"
