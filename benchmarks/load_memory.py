"""Peak memory while loading a real-size SD 1.5 single-file checkpoint (random weights, LDM layout).

    python benchmarks/load_memory.py

Writes the checkpoint once (`$LORAKIT_BENCH_CACHE`, default the temp folder), then loads it in a fresh
process and reports the seconds and the peak RSS during the load against the weights' fp32 size.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def high_water_gib() -> float:
    """The process's peak resident memory (VmHWM: reset by exec, unlike getrusage's ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(path: str) -> None:
    import torch

    from lorakit.families.sd.loading import load_sd_components

    before = high_water_gib()
    started = time.perf_counter()
    comps = load_sd_components(path, v2=False, v_parameterization=False)
    seconds = time.perf_counter() - started
    after_load = high_water_gib()
    modules = [comps.denoiser, comps.vae, *comps.text_encoders]
    # touch every weight, as the first training step does (memory-mapped pages are read in only then)
    weights = sum(p.numel() * 4 for m in modules for p in m.parameters())
    checksum = sum(float(p.detach().double().sum()) for m in modules for p in m.parameters())
    touched = high_water_gib()
    print(json.dumps({
        "load_seconds": round(seconds, 1), "weights_fp32_gib": round(weights / 2**30, 2),
        "rss_after_imports_gib": round(before, 2), "peak_rss_after_load_gib": round(after_load, 2),
        "peak_rss_after_touching_weights_gib": round(touched, 2),
        "peak_over_weights": round(touched * 2**30 / weights, 2), "torch": torch.__version__, "checksum_finite": checksum == checksum,
    }))


def main() -> None:
    from lorakit.bench_models import bench_model

    cache = Path(os.environ.get("LORAKIT_BENCH_CACHE", Path(tempfile.gettempdir()) / "lorakit-bench"))
    path = bench_model("sd", "real", cache).model_args[0].split("=", 1)[1]
    subprocess.run([sys.executable, __file__, "--child", str(path)], check=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
