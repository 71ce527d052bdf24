"""The memory planner (training/memory_plan.py): the estimate printed with every plan and by --dry_run, and
--vram_budget's choice.

The estimate is checked against a real run's measured peak resident memory (a fresh process, tiny SD 1.5 on the
CPU, where device and host memory are one); the other CPU configurations of the issue (real-size SD 1.5, FLUX with
and without block swap, a full fine-tune) take minutes and gigabytes, so they are measured by
benchmarks/plan_memory.py (numbers in benchmarks/README.md).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from helpers import write_dreambooth_folder
from lorakit.cli.main import main
from lorakit.families.registry import fixtures, get_family
from lorakit.training.memory_plan import GiB, Settings, candidate_settings, choose_for_budget, estimate_memory, parse_budget

ESTIMATE = re.compile(r"memory \(estimate\) peak ([0-9.]+) GiB")
# a run in a process of its own: peak resident memory (VmHWM) at the end, next to what its plan printed
CHILD = """
import json, sys
from lorakit.cli.main import main
code = main(sys.argv[1:])
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 2**20
print("RESULT " + json.dumps({"exit": code, "peak_gib": peak}))
"""


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("plan_flux")
    model_args, _ = fixtures("flux").bench_files("tiny", root / "model")
    data = write_dreambooth_folder(root / "data", count=2, repeats=1)
    return SimpleNamespace(model_args=model_args, data=data, root=root, family=get_family("flux"))


def _flux_cfg(flux, *extra: str):
    from lorakit.config import parse_train_args

    cfg, _ = parse_train_args([*flux.model_args, "--family=flux", f"--train_data_dir={flux.data}", "--resolution=512",
                               f"--output_dir={flux.root / 'out'}", "--mixed_precision=bf16", *extra])
    return cfg


def test_budget_sizes():
    assert parse_budget("12GB") == 12 * 10**9 and parse_budget("7.5GiB") == int(7.5 * GiB)
    assert parse_budget("8000MB") == 8 * 10**9 and parse_budget("auto") is None
    with pytest.raises(ValueError, match="--vram_budget twelve: expected a size such as 12GB"):
        parse_budget("twelve")


def test_savings_lower_the_estimate(flux):
    cfg = _flux_cfg(flux)
    facts = flux.family.memory_facts(cfg)
    buckets = [(512, 512, 1)]

    def device(**settings) -> int:
        return estimate_memory(cfg, flux.family, facts, buckets, on_gpu=True, host_now=0, settings=Settings(**settings)).device

    plain = device()
    assert device(gradient_checkpointing=True) < plain
    assert device(base_quant="nf4") < device(base_quant="int8") == device(base_quant="fp8_scaled") < plain  # bytes per weight
    assert device(blocks_to_swap=2) < device(blocks_to_swap=1) < plain
    # swapped blocks live in host buffers made once (theirs and those of the blocks they trade places with): host
    # RAM on a GPU; on the CPU, where the device is the host, they come on top of the model
    def swapping(blocks: int, on_gpu: bool):
        return estimate_memory(cfg, flux.family, facts, buckets, on_gpu=on_gpu, host_now=0, settings=Settings(blocks_to_swap=blocks))

    assert swapping(2, False).device > swapping(1, False).device > swapping(0, False).device


def test_budget_chooses_the_fastest_settings_that_fit(flux):
    cfg = _flux_cfg(flux)
    facts = flux.family.memory_facts(cfg)
    buckets = [(512, 512, 1)]
    candidates = candidate_settings(cfg, flux.family, facts)
    estimates = [estimate_memory(cfg, flux.family, facts, buckets, on_gpu=True, host_now=0, settings=s).device for s in candidates]
    budget = sorted(estimates)[len(estimates) // 2]  # half the combinations fit
    settings, estimate, why = choose_for_budget(cfg, flux.family, facts, buckets, budget, on_gpu=True, host_now=0)
    chosen = candidates.index(settings)
    assert estimate.device <= budget and all(e > budget for e in estimates[:chosen])  # every faster one is over
    assert why.startswith(f"--vram_budget {budget / GiB:.2f} GiB: chose {settings.describe()}")
    nothing, smallest, why = choose_for_budget(cfg, flux.family, facts, buckets, 1000, on_gpu=True, host_now=0)
    assert nothing is None and smallest.device == min(estimates) and "nothing fits" in why
    # options the command line gives are kept; the budget chooses the rest
    given = candidate_settings(_flux_cfg(flux, "--base_quant=int8", "--gradient_checkpointing"), flux.family, facts)
    assert {(s.base_quant, s.gradient_checkpointing) for s in given} == {("int8", True)}


def test_a_budget_nothing_fits_stops_before_loading(flux, capsys):
    argv = ["train", *flux.model_args, "--family=flux", f"--train_data_dir={flux.data}", "--resolution=64",
            f"--output_dir={flux.root / 'none'}", "--vram_budget=1MB", "--dry_run"]
    assert main(argv) == 2
    assert "--vram_budget 0.00 GiB: nothing fits; the smallest estimate is" in capsys.readouterr().err
    assert main(argv[:-2] + ["--vram_budget=auto", "--dry_run"]) == 2  # no GPU here
    assert "--vram_budget auto reads the GPU's memory" in capsys.readouterr().err


def test_the_estimate_is_within_15_percent_of_the_measured_peak_and_the_budget_holds(tmp_path):
    """Tiny SD 1.5, LoRA, 2 steps at batch 2, in a fresh process: the printed estimate against its VmHWM, and
    --vram_budget's choice measured under the budget."""
    model_args, _ = fixtures("sd").bench_files("tiny", tmp_path / "model")
    data = write_dreambooth_folder(tmp_path / "data", count=4, repeats=1)
    budget_gb = 1.0
    argv = ["train", "--family=sd", *model_args, f"--train_data_dir={data}", "--resolution=64", f"--output_dir={tmp_path / 'out'}",
            "--max_train_steps=2", "--train_batch_size=2", "--network_dim=16", "--network_alpha=16", "--cache_latents",
            "--max_data_loader_n_workers=0", f"--vram_budget={budget_gb}GB"]
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, timeout=600)
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["exit"] == 0, done.stdout[-2000:] + done.stderr[-2000:]
    estimate = float(ESTIMATE.search(done.stdout).group(1))
    assert abs(estimate - result["peak_gib"]) <= 0.15 * result["peak_gib"], (estimate, result["peak_gib"])
    assert "--vram_budget 1.00 GB" not in done.stdout and re.search(r"--vram_budget 0\.93 GiB: chose ", done.stdout)
    assert result["peak_gib"] * GiB < budget_gb * 1e9
    measured = re.search(r"memory \(measured\) peak ([0-9.]+) GiB host RAM", done.stdout + done.stderr)
    assert measured and abs(float(measured.group(1)) - result["peak_gib"]) < 0.05  # the run reports its own peak


def test_dry_run_prints_the_estimate_and_loads_nothing(flux, capsys):
    argv = ["train", *flux.model_args, "--family=flux", f"--train_data_dir={flux.data}", "--resolution=64",
            f"--output_dir={flux.root / 'dry'}", "--dry_run", "--blocks_to_swap=1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert ESTIMATE.search(text) and "of which GiB: " in text
    assert "network           networks.lora_flux dim=" in text, "the plan names the module the run builds"
