"""`lorakit cache`: latents written once to sd-scripts' .npz files, reused by a second run and by training."""

from __future__ import annotations

from pathlib import Path

from helpers import write_dreambooth_folder, write_tiny_checkpoints
from lorakit.cli.main import main


def test_cache_then_reuse_then_train(tmp_path, capsys):
    model = write_tiny_checkpoints(tmp_path / "models", "sd1")["folder"]
    data = write_dreambooth_folder(tmp_path / "data", count=3)
    args = [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", "--resolution=64",
            f"--output_dir={tmp_path / 'out'}", "--network_module=networks.lora", "--max_data_loader_n_workers=0"]
    assert main(["cache", *args]) == 0
    assert "3 encoded now, 0 already cached" in capsys.readouterr().out
    caches = sorted(Path(data).rglob("*.npz"))
    assert len(caches) == 3 and all(c.stat().st_size > 0 for c in caches)
    stamps = [c.stat().st_mtime_ns for c in caches]

    assert main(["cache", *args]) == 0
    assert "0 encoded now, 3 already cached" in capsys.readouterr().out
    assert main(["train", *args, "--cache_latents_to_disk", "--max_train_steps=2"]) == 0
    assert [c.stat().st_mtime_ns for c in caches] == stamps, "valid cache files are reused, not rewritten"
    assert (tmp_path / "out" / "last.safetensors").exists()


def test_cache_follows_the_console_log_options(tmp_path, restore_root_logging):
    """`lorakit cache` takes the train command's --console_log_* options like training does."""
    model = write_tiny_checkpoints(tmp_path / "models", "sd1")["folder"]
    data = write_dreambooth_folder(tmp_path / "data", count=1)
    log_file = tmp_path / "console.log"
    assert main(["cache", f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", "--resolution=64",
                     f"--output_dir={tmp_path / 'out'}", "--max_data_loader_n_workers=0", "--console_log_simple",
                     f"--console_log_file={log_file}", "--xformers"]) == 0
    logged = log_file.read_text(encoding="utf-8")
    # the option warning goes to the file, as a bare message (--console_log_simple)
    assert logged.splitlines()[0] == "--xformers: lorakit uses PyTorch SDPA attention instead; training continues"


def test_cache_needs_no_output_dir_and_keeps_the_option_warnings():
    """sd-scripts' cache scripts have no --output_dir (the files go beside the images); docs/datasets.md's line."""
    from lorakit.cli.cache import parse_cache_options

    cfg, warnings = parse_cache_options(["--pretrained_model_name_or_path=m.safetensors", "--train_data_dir=data",
                                         "--resolution=64", "--dataset_config=d.toml"])
    assert cfg.output_dir is None
    assert any(w.startswith("--dataset_config is given") for w in warnings)
