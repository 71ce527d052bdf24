"""`lorakit bench` end to end on a tiny model: the model files are written once and reused, the trainer run and
the bare step both happen, and the JSON carries consistent numbers (speed itself is measured in benchmarks/)."""

from __future__ import annotations

import json
import statistics

import pytest

from lorakit import bench
from lorakit.bench_models import bench_model
from lorakit.families.registry import get_family


def test_bench_flux_tiny_writes_consistent_json(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "result.json"
    assert bench.main(["--family", "flux", "--size", "tiny", "--steps", "5", "--repeats", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["family"], result["size"], result["device"]) == ("flux", "tiny", "cpu")
    assert result["bare_step_s"] > 0 and result["trainer_step_s"] > 0
    # two trainer runs, each paired with the bare step measured after it; the ratio is the pairs' median
    assert len(result["pair_ratios"]) == 2 and all(r > 0 for r in result["pair_ratios"])
    assert result["ratio"] == pytest.approx(statistics.median(result["pair_ratios"]), abs=1e-3)
    assert result["time_to_first_step_s"] > 0 and result["trainer_peak_memory_gib"] > 0
    # from process start: at least the in-call time, plus the interpreter, the imports and the earlier tests
    assert result["process_start_to_first_step_s"] > result["time_to_first_step_s"]
    files = sorted((tmp_path / "cache" / "flux_tiny").glob("*.safetensors"))
    assert [f.name for f in files] == ["ae.safetensors", "clip_l.safetensors", "flux1.safetensors", "t5xxl.safetensors"]
    stamps = [f.stat().st_mtime_ns for f in files]
    again = bench_model("flux", "tiny", tmp_path / "cache")  # reused, not rewritten
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert f"--network_module={get_family('flux').default_network_module}" in again.train_args()
    assert "--cache_text_encoder_outputs" in bench.BenchOptions(64, 1, 4, "no", False, 5).train_args()
    assert "--cache_text_encoder_outputs" not in bench.BenchOptions(64, 1, 4, "no", False, 5, cache_text=False).train_args()


def test_bench_rejects_bad_flux_blocks(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--family", "flux", "--size", "real", "--flux_blocks", "19"])
    assert exc.value.code == 2
    assert "--flux_blocks 19" in capsys.readouterr().err


def test_bench_rejects_zero_repeats(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--repeats", "0"])
    assert exc.value.code == 2
    assert "--repeats 0" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_bench_sync_debug_needs_a_gpu(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--sync_debug"])
    assert exc.value.code == 2
    assert "--sync_debug needs a CUDA GPU" in capsys.readouterr().err


def test_bench_runs_an_option_set_and_prints_its_peak_memory(tmp_path, monkeypatch, capsys):
    """--base_quant and --vram_budget reach both measurements; the budget's choice and both peaks are printed."""
    monkeypatch.setenv("LORAKIT_BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "result.json"
    argv = ["--family", "flux", "--size", "tiny", "--steps", "5", "--precision", "bf16", "--base_quant", "int8",
            "--vram_budget", "64GB", "--json", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert (result["base_quant"], result["vram_budget"], result["compile"]) == ("int8", "64GB", False)
    # a budget this large needs no other savings; the quantization the command line asks for is kept
    assert result["chosen"] == "--base_quant int8"
    assert result["host_peak_gib"] >= result["trainer_peak_memory_gib"] > 0
    text = capsys.readouterr().out
    assert "options: --base_quant int8 --vram_budget 64GB (chose --base_quant int8)" in text
    assert "peak memory: " in text and "host RAM" in text
    assert "--base_quant=int8" in bench.BenchOptions(64, 1, 4, "bf16", False, 5, base_quant="int8").train_args()
    assert "--compile" in bench.BenchOptions(64, 1, 4, "bf16", False, 5, compile=True).train_args()
