"""Peak memory of a full fine-tune of a real-size SD 1.5 (random weights, LDM single file) with AdamW, Adafactor,
and Adafactor with `--fused_backward_pass`.

    python benchmarks/finetune_memory.py                      # CPU: peak RSS of each run, in fresh processes
    python benchmarks/finetune_memory.py --resolution 512     # on a GPU: peak allocated GPU memory too

Each variant runs `lorakit finetune` (U-Net only, cached latents, 2 steps, batch 1, fp32 weights) in a process of
its own and reports its peak resident memory (VmHWM) and, on a GPU, `torch.cuda.max_memory_allocated`. The U-Net's
fp32 weights are 3.2 GiB: AdamW adds gradients (3.2) and two moments (6.4), Adafactor gradients and factored
second moments (a few MiB), the fused backward pass frees each gradient as soon as its parameter has stepped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ADAFACTOR = ["--optimizer_type=Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
             "warmup_init=False", "--max_grad_norm=0"]
VARIANTS = {
    "AdamW": ["--optimizer_type=AdamW"],
    "Adafactor": ADAFACTOR,
    "Adafactor + --fused_backward_pass": [*ADAFACTOR, "--fused_backward_pass"],
}


def high_water_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def child(argv: list[str]) -> None:
    import torch

    from lorakit.cli.main import main as lorakit_main

    code = lorakit_main(argv)
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print("RESULT " + json.dumps({"exit": code, "peak_rss_gib": round(high_water_gib(), 2),
                                  "peak_gpu_gib": round(gpu, 2) if gpu is not None else None}), flush=True)


def write_images(folder: Path, size: int) -> Path:
    from PIL import Image

    data = folder / "1_sks toy"
    data.mkdir(parents=True, exist_ok=True)
    for index in range(2):
        Image.new("RGB", (size, size), (40 * index, 120, 200)).save(data / f"{index}.png")
        (data / f"{index}.txt").write_text("sks toy", encoding="utf-8")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    from lorakit.bench_models import bench_model

    cache = Path(os.environ.get("LORAKIT_BENCH_CACHE", Path(tempfile.gettempdir()) / "lorakit-bench"))
    model = bench_model("sd", "real", cache).model_args[0].split("=", 1)[1]
    with tempfile.TemporaryDirectory() as tmp:
        data = write_images(Path(tmp) / "data", args.resolution)
        for name in args.variants:
            argv = ["finetune", f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}",
                    f"--resolution={args.resolution}", f"--output_dir={tmp}/out", "--output_name=ft", "--max_train_steps=2",
                    "--learning_rate=1e-5", "--cache_latents", "--gradient_checkpointing", "--seed=1",
                    "--max_data_loader_n_workers=0", "--caption_extension=.txt", *VARIANTS[name]]
            done = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            result = json.loads(lines[-1][7:]) if lines else {"error": done.stderr[-2000:]}
            print(json.dumps({"variant": name, "resolution": args.resolution, **result}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
