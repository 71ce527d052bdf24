"""`lorakit bench`: the trainer's step time against the physical limit, the bare model step.

The bare step is the same model with the same LoRA modules, set up by the trainer's own code (`setup_session`: loading,
placement, `--fp8_base`, `--blocks_to_swap`, checkpointing, the network): the family's forward on random latents
noised by the family's objective with a fixed text conditioning, MSE loss, backward, AdamW step — nothing else.
The trainer's step is measured inside a real `lorakit train` run (data loading, text encoding or its cache,
noising, loss weighting, logging included) on cached latents. Their ratio is what the trainer adds; 1.0 is the
limit.

Models (`--family` any family with benchmark models, `--size tiny|real`; `--size sd15` is `--family sd --size real`): the test models,
or real shapes with random weights written once in the family's single-file layout (`bench_models.py`), so model
loading is measured from a real file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from lorakit.bench_models import SIZES, BenchModel, bench_families, bench_model, size_aliases


@dataclass
class BenchResult:
    family: str
    size: str
    device: str
    resolution: int
    batch: int
    rank: int
    precision: str
    gradient_checkpointing: bool
    fp8_base: bool
    blocks_to_swap: int
    text_encoder_outputs_cached: bool
    bare_step_s: float
    trainer_step_s: float
    ratio: float
    pair_ratios: list[float]
    time_to_first_step_s: float
    process_start_to_first_step_s: float | None  # the first run's, interpreter start and imports included (Linux)
    trainer_peak_memory_gib: float
    peak_memory_gib: float
    notes: list[str]
    base_quant: str | None = None
    compile: bool = False
    vram_budget: str | None = None
    chosen: str | None = None  # what --vram_budget chose (the memory options the runs used)
    host_peak_gib: float = 0.0  # the process's peak resident memory (on the CPU: the same as the device peak)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return host_peak_gib()


def host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


@dataclass
class BenchOptions:
    resolution: int
    batch: int
    rank: int
    precision: str
    checkpointing: bool
    steps: int
    fp8_base: bool = False
    blocks_to_swap: int = 0
    # the frozen text encoders run once per caption (--cache_text_encoder_outputs); off, they run every step, as
    # in sd-scripts' SD 1.x training, which has no such cache
    cache_text: bool = True
    base_quant: str | None = None  # --base_quant (fp8 is --fp8_base)
    compile: bool = False  # --compile: each denoiser block compiled
    vram_budget: str | None = None  # --vram_budget: the planner picks swap, checkpointing and quantization

    def train_args(self) -> list[str]:
        args = [
            f"--resolution={self.resolution}", f"--network_dim={self.rank}", f"--network_alpha={self.rank}",
            "--network_train_unet_only", f"--train_batch_size={self.batch}", "--cache_latents",
            f"--mixed_precision={self.precision}", "--max_data_loader_n_workers=0", "--seed=0", "--learning_rate=1e-4",
        ]
        args += ["--gradient_checkpointing"] if self.checkpointing else []
        args += ["--cache_text_encoder_outputs"] if self.cache_text else []
        args += ["--fp8_base"] if self.fp8_base else []
        args += [f"--base_quant={self.base_quant}"] if self.base_quant else []
        args += ["--compile"] if self.compile else []
        args += [f"--vram_budget={self.vram_budget}"] if self.vram_budget else []
        return args + ([f"--blocks_to_swap={self.blocks_to_swap}"] if self.blocks_to_swap else [])


def write_dataset(work: Path, resolution: int, count: int) -> Path:
    data = work / "data" / "1_bench"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (resolution, resolution), (40 * (i % 6), 90, 160)).save(data / f"{i}.png")
        (data / f"{i}.caption").write_text("a benchmark image of a square")
    return work / "data"


def _train_config(model: BenchModel, options: BenchOptions, work: Path, output: str, steps: int):
    """The `lorakit train` options both measurements share, with their own output folder and step count."""
    from lorakit.config import parse_train_args

    cfg, _ = parse_train_args([
        *model.train_args(), *options.train_args(), f"--train_data_dir={work / 'data'}", f"--output_dir={work / output}",
        f"--max_train_steps={steps}",
    ])
    return cfg


MEMORY_OPTIONS = ("blocks_to_swap", "gradient_checkpointing", "base_quant", "fp8_base")  # what --vram_budget sets


def bare_step_seconds(model: BenchModel, options: BenchOptions, work: Path, chosen: dict | None = None) -> float:
    """Median seconds of the model's forward + MSE + backward + AdamW with the trainer's LoRA attached; `chosen`:
    the memory options the trainer's run ended up with (--vram_budget's choice, made by the run's planner)."""
    from lorakit.families.registry import resolve_family
    from lorakit.training.run import make_accelerator
    from lorakit.training.setup import setup_session

    cfg = _train_config(model, options, work, "bare", 1)
    for name, value in (chosen or {}).items():
        setattr(cfg, name, value)
    family = resolve_family(cfg)
    session = setup_session(cfg, family, make_accelerator(cfg))
    comps, accelerator, device = session.comps, session.accelerator, session.accelerator.device
    with torch.no_grad(), accelerator.autocast():
        text = family.encode_text(comps, ["a benchmark image of a square"] * options.batch)
    scale = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    side = options.resolution // scale
    latents = torch.randn(options.batch, comps.vae.config.latent_channels, side, side, device=device, dtype=session.weight_dtype)
    noised = session.objective.noise(latents, generator=torch.Generator(device=device).manual_seed(0))
    optimizer = torch.optim.AdamW(session.trainable.trainable_parameters(), lr=1e-4)
    times = []
    for _ in range(max(3, options.steps - 4) + 2):  # as many timed steps as the trainer's steady part
        started = time.perf_counter()
        with accelerator.autocast():
            prediction = family.predict(comps, noised.noisy, noised.timesteps, text, None)
        loss = torch.nn.functional.mse_loss(prediction.float(), noised.target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


def process_age_seconds() -> float | None:
    """Seconds since this process started (Linux /proc), so start-up counts the interpreter and the imports too."""
    try:
        fields_after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_ticks = int(fields_after_name[19])  # field 22, starttime, in clock ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - started_ticks / os.sysconf("SC_CLK_TCK")


def trainer_run(model: BenchModel, options: BenchOptions, work: Path, output: str = "out") -> tuple[list[float], float, dict]:
    """(seconds per step, seconds from the call to the end of the first step, the memory options it ran with) of a
    real `lorakit train` run."""
    from lorakit.training.run import train

    cfg = _train_config(model, options, work, output, options.steps)
    started = time.perf_counter()
    result = train(cfg)
    ends = result.step_end_times
    return [b - a for a, b in zip(ends, ends[1:])], ends[0] - started, {n: getattr(cfg, n) for n in MEMORY_OPTIONS}


def steady_step_seconds(step_times: list[float], device: torch.device) -> float:
    """Seconds per step after the first 4 (warm-up, caches). On a CPU every step's time is exact, so the median
    is taken (a shared machine's hiccups are outliers); on a GPU only the loss read every 5 steps synchronises,
    so the mean over whole 5-step windows is the exact figure."""
    steady = step_times[4:] or step_times
    if device.type != "cuda":
        return statistics.median(steady)
    usable = len(steady) - len(steady) % 5 or len(steady)
    return sum(steady[:usable]) / usable


def run(family: str, size: str, options: BenchOptions, blocks: tuple[int, int] | None = None,
        repeats: int = 1, sync_debug: bool = False) -> BenchResult:
    """Trainer run, then bare step, `repeats` times in turn. A shared machine's speed drifts over minutes, so each
    trainer run is compared with the bare step measured right after it, and the reported ratio is the median of
    those pairs (the step times are the medians of the runs)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = Path(os.environ.get("LORAKIT_BENCH_CACHE", Path(tempfile.gettempdir()) / "lorakit-bench"))
    model = bench_model(family, size, cache, blocks)
    trainer_steps, bare_steps, trainer_peak, process_peak = [], [], 0.0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_dataset(work, options.resolution, max(options.batch * 4, 8))
        for attempt in range(max(1, repeats)):
            age = process_age_seconds()
            with _warn_on_sync(sync_debug and attempt == 0):
                step_times, first, chosen = trainer_run(model, options, work, f"out{attempt}")
            trainer_steps.append(steady_step_seconds(step_times, device))
            if attempt == 0:  # later runs find the imports done and the files in the page cache
                first_step, from_process_start = first, None if age is None else age + first
            trainer_peak = max(trainer_peak, peak_memory_gib(device))
            _release(device)
            bare_steps.append(bare_step_seconds(model, options, work, chosen))
            process_peak = max(process_peak, trainer_peak, peak_memory_gib(device))
            _release(device)
    pairs = [round(t / b, 3) for t, b in zip(trainer_steps, bare_steps)]
    trainer, bare = statistics.median(trainer_steps), statistics.median(bare_steps)
    return BenchResult(
        family, size, device.type, options.resolution, options.batch, options.rank, options.precision, options.checkpointing,
        options.fp8_base, options.blocks_to_swap, options.cache_text, round(bare, 5), round(trainer, 5), round(statistics.median(pairs), 3),
        pairs, round(first_step, 2), None if from_process_start is None else round(from_process_start, 2), round(trainer_peak, 2), round(process_peak, 2), model.notes,
        options.base_quant, options.compile, options.vram_budget, _describe(chosen) if options.vram_budget else None,
        round(host_peak_gib(), 2),
    )


def _describe(chosen: dict) -> str:
    from lorakit.training.memory_plan import Settings

    return Settings(int(chosen["blocks_to_swap"] or 0), bool(chosen["gradient_checkpointing"]), chosen["base_quant"]).describe()


@contextlib.contextmanager
def _warn_on_sync(enabled: bool) -> Iterator[None]:
    """With --sync_debug (GPU): PyTorch warns at every call that makes the CPU wait for the GPU (an `.item()`, a
    blocking copy), once per call site; set-up calls are listed too, the per-step ones repeat every step."""
    if enabled:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        yield
    finally:
        if enabled:
            torch.cuda.set_sync_debug_mode("default")


def _release(device: torch.device) -> None:
    """Free the last model before the next run builds its own (the GPU peak is reset in between, so the trainer's
    peak is its own; on the CPU the peak RSS is the process's)."""
    import gc

    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorakit bench", description=__doc__.splitlines()[0])
    aliases = size_aliases()
    parser.add_argument("--family", choices=bench_families(), default=bench_families()[-1])  # the registry's fallback family
    parser.add_argument("--size", choices=(*SIZES, *aliases), default="tiny",
                        help="tiny test model or real shapes; " + ", ".join(f"{a} = --family {f} --size {z}" for a, (f, z) in aliases.items()))
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--fp8_base", action="store_true", help="weights stored as float8_e4m3fn (FLUX)")
    parser.add_argument("--blocks_to_swap", type=int, default=0, help="FLUX blocks streamed from the CPU")
    parser.add_argument("--base_quant", choices=("fp8", "fp8_scaled", "int8", "nf4"), default=None,
                        help="frozen weights quantized (docs/memory.md)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block of the denoiser")
    parser.add_argument("--vram_budget", default=None, help="the planner fits the run into this (12GB, auto)")
    parser.add_argument("--flux_blocks", default=None,
                        help="double,single blocks of the real-size FLUX transformer (default 19,38 = FLUX.1)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1,
                        help="trainer run and bare step this many times in turn; the ratio is the median of the pairs")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--no_text_cache", action="store_true",
                        help="encode the captions every step (sd-scripts' SD 1.x has no text-encoder cache)")
    parser.add_argument("--sync_debug", action="store_true",
                        help="GPU only: warn at every call in the (first) trainer run that waits for the GPU")
    args = parser.parse_args(argv)
    family, size = aliases.get(args.size, (args.family, args.size))
    try:
        blocks = tuple(int(n) for n in args.flux_blocks.split(",")) if args.flux_blocks else None
        assert blocks is None or (len(blocks) == 2 and min(blocks) >= 1)
    except (ValueError, AssertionError):
        parser.error(f"--flux_blocks {args.flux_blocks}: expected two positive numbers, double,single (e.g. 19,38)")
    options = BenchOptions(args.resolution, args.batch, args.rank, args.precision, args.gradient_checkpointing, args.steps,
                           args.fp8_base, args.blocks_to_swap, not args.no_text_cache, args.base_quant, args.compile,
                           args.vram_budget)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: expected 1 or more")
    if args.sync_debug and not torch.cuda.is_available():
        parser.error("--sync_debug needs a CUDA GPU (it lists the calls that make the CPU wait for the GPU)")
    result = run(family, size, options, blocks, args.repeats, args.sync_debug)
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2))
    return 0


def format_table(result: BenchResult) -> str:
    header = (f"{'model':11} {'device':6} {'reso':>5} {'batch':>5} {'bare s/step':>12} {'trainer s/step':>15} {'ratio':>6} "
              f"{'first step s':>12} {'train peak GiB':>14}")
    options = " ".join(o for o in (f"--base_quant {result.base_quant}" if result.base_quant else "",
                                   "--compile" if result.compile else "",
                                   f"--vram_budget {result.vram_budget} (chose {result.chosen})" if result.vram_budget else "") if o)
    row = (f"{result.family + '/' + result.size:11} {result.device:6} {result.resolution:5} {result.batch:5} "
           f"{result.bare_step_s:12.4f} {result.trainer_step_s:15.4f} {result.ratio:6.3f} {result.time_to_first_step_s:12.1f} "
           f"{result.trainer_peak_memory_gib:14.2f}")
    starts = ([f"process start to the end of the first step: {result.process_start_to_first_step_s:.1f} s "
               "(interpreter and imports included)"] if result.process_start_to_first_step_s is not None else [])
    pairs = [f"ratio per trainer/bare pair, in run order: {', '.join(f'{r:.3f}' for r in result.pair_ratios)}"]
    options_line = [f"options: {options}"] if options else []
    options_line.append(f"peak memory: {result.trainer_peak_memory_gib:.2f} GiB "
                        f"{'device (allocated)' if result.device == 'cuda' else 'RSS'} in the trainer's run, "
                        f"{result.host_peak_gib:.2f} GiB host RAM (the process's peak)")
    return "\n".join([header, row, *options_line, *starts, *(pairs if len(result.pair_ratios) > 1 else []), *(f"note: {note}" for note in result.notes)])
