"""The memory planner's estimate against the measured peak, for the CPU configurations of docs/memory.md.

    python benchmarks/plan_memory.py                    # every configuration
    python benchmarks/plan_memory.py --only tiny_sd15   # some of them

Each configuration runs `lorakit train` / `lorakit finetune` in a process of its own; the estimate is the
"memory (estimate) peak" line of the plan that very run printed, the measurement its peak resident memory
(VmHWM) at the end. The `budget` configuration gives `--vram_budget` and checks that the measured peak is under it.
Real-size SD 1.5 is built from its config with random weights once (`$LORAKIT_BENCH_CACHE`, as `lorakit bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

COMMON = ["--max_train_steps=2", "--learning_rate=1e-4", "--cache_latents", "--seed=1", "--max_data_loader_n_workers=0",
          "--caption_extension=.txt"]
LORA = ["--network_dim=16", "--network_alpha=16", "--network_train_unet_only", "--cache_text_encoder_outputs"]
FLUX_BLOCKS = (3, 6)  # real-width FLUX.1 with 3 double and 6 single blocks: the smallest that swaps 3 blocks
CONFIGS = {  # name: (command, model family, size, resolution, options)
    "tiny_sd15": ("train", "sd", "tiny", 64, ["--train_batch_size=2", *LORA]),
    "real_sd15": ("train", "sd", "real", 256, ["--gradient_checkpointing", *LORA]),
    "tiny_flux": ("train", "flux", "tiny", 64, ["--train_batch_size=2", *LORA]),
    "flux_3x6": ("train", "flux", "real", 64, ["--mixed_precision=bf16", *LORA]),
    "flux_3x6_swap": ("train", "flux", "real", 64, ["--mixed_precision=bf16", "--blocks_to_swap=3", *LORA]),
    "real_sd15_fp8_scaled": ("train", "sd", "real", 256, ["--base_quant=fp8_scaled", *LORA]),
    "real_sd15_finetune": ("finetune", "sd", "real", 64, ["--gradient_checkpointing", "--optimizer_type=AdamW"]),
    "real_sd15_budget": ("train", "sd", "real", 256, ["--vram_budget=5.6GB", *LORA]),
}


def high_water_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def child(argv: list[str]) -> None:
    from lorakit.cli.main import main as lorakit_main

    code = lorakit_main(argv)
    print("RESULT " + json.dumps({"exit": code, "peak_rss_gib": round(high_water_gib(), 3)}), flush=True)


def write_images(folder: Path, size: int) -> Path:
    from PIL import Image

    data = folder / "1_sks toy"
    data.mkdir(parents=True, exist_ok=True)
    for index in range(4):
        Image.new("RGB", (size, size), (40 * index, 120, 200)).save(data / f"{index}.png")
        (data / f"{index}.txt").write_text("sks toy", encoding="utf-8")
    return folder


def measure(name: str, work: Path, cache: Path) -> dict:
    from lorakit.bench_models import bench_model

    command, family, size, resolution, options = CONFIGS[name]
    model = bench_model(family, size, cache, FLUX_BLOCKS if family == "flux" and size == "real" else None)
    data = write_images(work / f"data{resolution}", resolution)
    argv = [command, f"--family={family}", *model.model_args, f"--train_data_dir={data}", f"--resolution={resolution}",
            f"--output_dir={work}/{name}", "--output_name=out", *COMMON, *options]
    done = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True)
    found = re.search(r"memory \(estimate\) peak ([0-9.]+) GiB", done.stdout)
    chose = re.search(r"--vram_budget ([0-9.]+) GiB: chose ([^\n]*)", done.stdout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1][7:]) if lines else {"error": (done.stdout + done.stderr)[-3000:]}
    if found and "peak_rss_gib" in result:
        result["estimate_gib"] = float(found.group(1))
        result["error_pct"] = round(100 * (result["estimate_gib"] - result["peak_rss_gib"]) / result["peak_rss_gib"], 1)
    if chose:
        result["budget_gib"], result["chose"] = float(chose.group(1)), chose.group(2)
        result["under_budget"] = result.get("peak_rss_gib", 1e9) <= result["budget_gib"]
    return {"config": name, "resolution": resolution, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(CONFIGS))
    args = parser.parse_args()
    cache = Path(os.environ.get("LORAKIT_BENCH_CACHE", Path(tempfile.gettempdir()) / "lorakit-bench"))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            print(json.dumps(measure(name, Path(tmp), cache)), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
