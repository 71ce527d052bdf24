"""Time and peak memory of the SVD tools on real-size layer shapes: `resize` (rank 32 -> 8) and `extract` (SVD of
weight differences at dim 32), for SDXL and FLUX.1.

The layer shapes are the real ones: each family's own `adapter_targets` is asked for its LoRA targets on a model
built on the meta device from the bundled real configs (SDXL: the U-Net's transformer linears + CLIP-L +
CLIP-G; FLUX.1-dev: the 19 double and 38 single blocks at width 3072, DiT only, as `networks.lora_flux` trains by
default). Weights are random; SVD time does not depend on the values.

* resize: a rank-32 LoRA on every target is resized to rank 8 by `tools.resize.resize_modules` (what
  `lorakit lora resize` runs after loading the file). Time and peak memory are for the whole LoRA.
* extract: `tools.svd.factorise(ΔW, 32, clamp_quantile=0.99)` is what `tools.extract` runs per module. Every
  distinct layer shape is timed on random ΔW (`--reps` times, the median kept) and the total is extrapolated
  as Σ count(shape) · time(shape); the output says so. Peak memory is that of one ΔW at a time (the largest),
  i.e. the SVD workspace, not the two models an extraction also holds.

Each case runs in its own subprocess and reports `resource.getrusage` ru_maxrss, so the peaks do not mix
(tracemalloc cannot see torch's allocations). The import baseline (torch + lorakit, no weights) is reported too.

    python benchmarks/tools_svd.py --out benchmarks/results/tools_svd_cpu.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = ("baseline", "resize_sdxl", "resize_flux", "extract_sdxl", "extract_flux")


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---------------------------------------------------------------------------------------------- shapes


class _Options:
    """The few training options the families' `adapter_targets` read."""

    def __init__(self, dim: int, unet_only: bool):
        self.network_dim = dim
        self.network_alpha = float(dim)
        self.network_args = None
        self.network_train_unet_only = unet_only
        self.network_train_text_encoder_only = False

    def network_kwargs(self) -> dict[str, str]:
        return {}


def _shape(module) -> tuple[int, ...]:
    if hasattr(module, "in_features"):
        return (int(module.out_features), int(module.in_features))
    return tuple(int(s) for s in module.weight.shape)


def sdxl_shapes(dim: int) -> list[tuple[str, tuple[int, ...]]]:
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lorakit.families.base import Components
    from lorakit.families.sdxl.family import StableDiffusionXLFamily

    folder = REPO / "src/lorakit/families/sdxl/configs/sdxl_base"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((folder / "unet.json").read_text()))
        te1 = CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder.json"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(folder / "text_encoder_2.json"))
    comps = Components(denoiser=unet, vae=None, text_encoders=[te1, te2], tokenizers=[None, None])
    return [(t.name, _shape(t.module)) for t in StableDiffusionXLFamily().adapter_targets(comps, _Options(dim, unet_only=False))]


def flux_shapes(dim: int, double: int, single: int) -> list[tuple[str, tuple[int, ...]]]:
    import torch
    from diffusers import FluxTransformer2DModel

    from lorakit.families.flux.family import FluxFamily
    from lorakit.families.flux.network_args import FluxNetworkArgs

    config = json.loads((REPO / "src/lorakit/families/flux/configs/transformer_dev.json").read_text())
    config.update(num_layers=double, num_single_layers=single)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
    options = _Options(dim, unet_only=True)
    targets = FluxFamily._transformer_targets(transformer, FluxNetworkArgs.from_config(options), float(dim))
    return [(t.name, _shape(t.module)) for t in targets]


def shapes_for(family: str, dim: int, args: argparse.Namespace) -> list[tuple[str, tuple[int, ...]]]:
    return sdxl_shapes(dim) if family == "sdxl" else flux_shapes(dim, args.flux_double, args.flux_single)


# ---------------------------------------------------------------------------------------------- cases


def run_resize(family: str, args: argparse.Namespace) -> dict:
    import torch

    from lorakit.tools.lora_state import LoraFactors
    from lorakit.tools.resize import resize_modules

    shapes = shapes_for(family, 32, args)
    generator = torch.Generator().manual_seed(0)
    modules = {}
    for name, shape in shapes:
        rest = shape[1:]
        down = torch.randn(32, *rest, generator=generator) / float(torch.tensor(rest).prod()) ** 0.5
        up = torch.randn(shape[0], 32, *([1, 1] if len(shape) == 4 else []), generator=generator) * 0.01
        modules[name] = LoraFactors(name, down, up, 16.0)
    params = sum(m.down.numel() + m.up.numel() for m in modules.values())
    start = time.perf_counter()
    resized, report = resize_modules(modules, 8)
    seconds = time.perf_counter() - start
    assert all(m.rank == 8 for m in resized.values())
    return {
        "modules": len(modules), "lora_parameters": params, "lora_fp32_gib": params * 4 / 2**30,
        "seconds": seconds, "mean_fro_retained": report.mean_fro_retained(),
    }


def run_extract(family: str, args: argparse.Namespace) -> dict:
    import torch

    from lorakit.tools.svd import factorise

    shapes = shapes_for(family, 32, args)
    counts = Counter(shape for _, shape in shapes)
    generator = torch.Generator().manual_seed(0)
    per_shape = {}
    for shape in sorted(counts, key=lambda s: -torch.Size(s).numel()):
        delta = torch.randn(*shape, generator=generator) * 1e-3
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            result = factorise(delta, min(32, shape[0], shape[1]), clamp_quantile=0.99)
            times.append(time.perf_counter() - start)
        assert result.rank == min(32, shape[0], shape[1])
        per_shape["x".join(map(str, shape))] = {"count": counts[shape], "seconds": statistics.median(times)}
        print(f"{family} extract {shape}: {statistics.median(times):.1f} s x {counts[shape]}", file=sys.stderr, flush=True)
        del delta, result
    total = sum(v["count"] * v["seconds"] for v in per_shape.values())
    timed = sum(args.reps * v["seconds"] for v in per_shape.values())
    return {
        "modules": len(shapes), "distinct_shapes": len(counts), "reps_per_shape": args.reps,
        "seconds_extrapolated": total, "seconds_measured": timed, "per_shape": per_shape,
        "note": "each distinct shape timed (median of reps) and multiplied by its count; one ΔW in memory at a time",
    }


def run_case(case: str, args: argparse.Namespace) -> dict:
    import torch

    importlib.import_module("lorakit.tools.resize")  # the import baseline includes lorakit

    baseline = _rss_gib()
    # the machine is shared: the load average beside each case says how contended its timings were
    result: dict = {"case": case, "threads": torch.get_num_threads(), "load_average_before": os.getloadavg()[0]}
    if case == "resize_sdxl":
        result.update(run_resize("sdxl", args))
    elif case == "resize_flux":
        result.update(run_resize("flux", args))
    elif case == "extract_sdxl":
        result.update(run_extract("sdxl", args))
    elif case == "extract_flux":
        result.update(run_extract("flux", args))
    result["load_average_after"] = os.getloadavg()[0]
    result["rss_after_imports_gib"] = baseline
    result["peak_rss_gib"] = _rss_gib()
    return result


# ---------------------------------------------------------------------------------------------- driver


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=CASES, default=None, help="run one case in this process (internal)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--flux_double", type=int, default=19, help="FLUX double blocks (real: 19)")
    parser.add_argument("--flux_single", type=int, default=38, help="FLUX single blocks (real: 38)")
    parser.add_argument("--reps", type=int, default=1, help="extract: timings per distinct shape")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--omp_wait_policy", default="PASSIVE", help="OMP_WAIT_POLICY of the cases (PASSIVE or ACTIVE)")
    args = parser.parse_args()
    forwarded = ["--flux_double", str(args.flux_double), "--flux_single", str(args.flux_single), "--reps", str(args.reps)]
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return 0
    # OpenMP threads that spin while waiting make every SVD tens of times slower when the cores are shared
    # (a 1280x1280 SVD: 56 s instead of 0.7 s at load 5 on 2 cores); passive waiting removes that
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"), OMP_WAIT_POLICY=args.omp_wait_policy)
    results = []
    for case in args.cases:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--case", case, *forwarded], stdout=subprocess.PIPE, text=True, env=env)
        if done.returncode != 0:
            return done.returncode
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["wall_seconds_with_setup"] = time.perf_counter() - start
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "per_shape"}), flush=True)
    report = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "flux_blocks": {"double": args.flux_double, "single": args.flux_single},
        "omp_wait_policy": args.omp_wait_policy,
        "results": results,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
