"""The memory planner: a run's peak device and host memory, estimated before anything loads, and `--vram_budget`.

The estimate (`estimate_memory`) adds up, from the model files' headers (`family.memory_facts`) and the options:

* the frozen weights in the dtype they are kept in (the mixed-precision dtype, or `--base_quant`'s bytes per
  weight: `quant.BYTES_PER_WEIGHT`), the text encoders (counted even when their outputs are cached), the VAE;
* what trains: the adapter network (rank × (in + out) per adapted linear of the denoiser, float32) or, for a
  fine-tune, the denoiser's own weights (float32, or 16-bit with --full_bf16/--full_fp16), with their gradients
  (none kept with --fused_backward_pass) and the optimizer's states (2 per weight for AdamW, 0.5 for 8-bit
  AdamW, 1 for Lion and SGD with momentum, about none for Adafactor's factored moments);
* activations for the largest bucket × batch: `family.activation_factor` saved elements per latent pixel and per
  square root of the denoiser's parameters (a calibrated rule: depth × width grows as √parameters), in the compute
  dtype, and with gradient checkpointing only the block inputs (`CHECKPOINTED_SHARE`) plus one block's work;
* block swap: the swapped blocks' weights move from the device to (pinned) host buffers, made once: one for each
  swapped weight and one for each weight of the blocks they trade places with during the forward (the swapped
  blocks counted are the largest, so with blocks of different sizes this is an upper bound); on a CPU, where the
  device is the host, the buffers come on top of the model;
* the host's own: the process as it is when the plan is made (interpreter, torch, libraries), and while loading
  the file-to-model copy (`LOAD_OVERHEAD` of the weights) and, with --base_quant other than fp8, the quantized
  copies made while the loaded weights are still held.

On a CPU the device is the host: the two peaks are one (RSS). `choose_for_budget` tries the settings that save
memory in the order they cost speed, and keeps the first combination whose device estimate fits.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from itertools import product
from typing import Any

from lorakit.families.common.memory_facts import MemoryFacts
from lorakit.families.common.quant import BYTES_PER_WEIGHT

GiB = 2**30
LOAD_OVERHEAD = 0.15  # the loaders copy one memory-mapped tensor at a time into the built model
CHECKPOINTED_SHARE = 0.12  # activations kept under gradient checkpointing, against none
HOST_BUFFERS_PER_SWAPPED = 2  # block swap: host buffers of the swapped blocks and of those they trade places with
IMPORTS_AFTER_PLAN = 0.22 * GiB  # model classes, kernels and allocator pools after the plan (measured on the CPU: tiny runs)
LARGE_ENCODER = 1_000_000_000  # text encoders quantized with --base_quant beside the denoiser (T5-XXL, LLMs)
OPTIMIZER_STATES = ((r"8bit", 0.5), (r"adafactor", 0.01), (r"lion", 1.0), (r"^sgd", 0.0), (r"prodigy", 4.0), (r"", 2.0))
# relative step time of each memory saving (used to rank combinations: the cheapest that fits wins)
SLOWDOWN = {"checkpointing": 1.3, "fp8": 1.03, "fp8_scaled": 1.05, "int8": 1.1, "nf4": 1.25, "per_swapped_block": 0.015}


@dataclass(frozen=True)
class Settings:
    """The options the planner chooses among."""

    blocks_to_swap: int = 0
    gradient_checkpointing: bool = False
    base_quant: str | None = None

    def slowdown(self, blocks: int) -> float:
        cost = SLOWDOWN["checkpointing"] if self.gradient_checkpointing else 1.0
        cost *= SLOWDOWN.get(self.base_quant or "", 1.0)
        return cost * (1 + SLOWDOWN["per_swapped_block"] * self.blocks_to_swap * 57 / max(blocks, 1))

    def describe(self) -> str:
        parts = [f"--blocks_to_swap {self.blocks_to_swap}" if self.blocks_to_swap else "",
                 "--gradient_checkpointing" if self.gradient_checkpointing else "",
                 f"--base_quant {self.base_quant}" if self.base_quant else ""]
        return " ".join(p for p in parts if p) or "no memory savings"


@dataclass
class MemoryEstimate:
    device: int  # bytes at the peak, on the device (on a CPU: the host's RAM)
    host: int
    items: list[tuple[str, int]] = field(default_factory=list)  # what the device peak is made of

    def lines(self, device_name: str) -> list[str]:
        parts = ", ".join(f"{name} {bytes_ / GiB:.2f}" for name, bytes_ in self.items if bytes_ >= GiB / 1000)
        same = device_name == "cpu"
        head = (f"  memory (estimate) peak {self.host / GiB:.2f} GiB host RAM (training on the CPU)" if same else
                f"  memory (estimate) peak {self.device / GiB:.2f} GiB {device_name}, {self.host / GiB:.2f} GiB host RAM")
        return [head, f"    of which GiB: {parts}"]


def estimate_memory(cfg: Any, family: Any, facts: MemoryFacts, buckets: list[tuple[int, int, int]], *, on_gpu: bool,
                    host_now: int, settings: Settings | None = None) -> MemoryEstimate:
    """The peaks of a run of `cfg` (with `settings` instead of its own memory options, when given); `buckets` are
    (width, height, batch) of the dataset's buckets; `host_now` the process's resident bytes at planning time."""
    settings = settings or current_settings(cfg)
    compute = 2 if getattr(cfg, "mixed_precision", "no") in ("fp16", "bf16") else 4
    trains_model = bool(getattr(cfg, "trains_model_weights", False))
    frozen_bytes = _frozen_bytes(cfg, family, facts, settings, compute, trains_model)
    trained, trained_bytes = _trained(cfg, facts, trains_model)
    states = _optimizer_states(cfg) * trained * 4
    grads = 0 if getattr(cfg, "fused_backward_pass", False) else trained * trained_bytes
    activations = _activation_bytes(family, facts, buckets, settings, compute)
    swapped = _swapped_bytes(facts, settings, compute if not settings.base_quant else BYTES_PER_WEIGHT[settings.base_quant])
    items = [("frozen weights", frozen_bytes - swapped), ("trained weights", trained * trained_bytes), ("gradients", grads),
             ("optimizer states", states), ("activations", activations)]
    training = sum(b for _, b in items)
    loading = _loading_bytes(cfg, family, facts, settings, compute, trains_model, frozen_bytes)
    baseline = host_now + IMPORTS_AFTER_PLAN
    # block swap's host buffers, made once: one per swapped weight and one per weight of the blocks they trade
    # places with in the forward (the first blocks of the list); on the CPU they come on top of the model itself
    buffers = HOST_BUFFERS_PER_SWAPPED * swapped
    if not on_gpu:
        peak = baseline + max(training + swapped + buffers, loading)
        return MemoryEstimate(peak, peak, [("runtime", baseline), *items, ("block swap buffers", buffers)])
    return MemoryEstimate(training, baseline + max(buffers, loading), items)


def current_settings(cfg: Any) -> Settings:
    quant = getattr(cfg, "base_quant", None)
    return Settings(int(getattr(cfg, "blocks_to_swap", 0) or 0), bool(getattr(cfg, "gradient_checkpointing", False)), quant)


def _loading_bytes(cfg: Any, family: Any, facts: MemoryFacts, settings: Settings, compute: int, trains_model: bool,
                   frozen_bytes: int) -> int:
    """The host's peak while loading: the weights in the load dtype plus the file-to-model copy; --base_quant
    other than fp8 (which the families apply as they load) quantizes the loaded weights afterwards, so the
    quantized copies are made while the loaded ones are still held."""
    loaded = frozen_bytes
    if settings.base_quant not in (None, "fp8"):
        loaded = _frozen_bytes(cfg, family, facts, Settings(settings.blocks_to_swap, settings.gradient_checkpointing),
                               compute, trains_model) + frozen_bytes
    return int(loaded * (1 + LOAD_OVERHEAD)) + (facts.params("denoiser") * 4 if trains_model else 0)


def _frozen_bytes(cfg: Any, family: Any, facts: MemoryFacts, settings: Settings, compute: int, trains_model: bool) -> int:
    quant = BYTES_PER_WEIGHT.get(settings.base_quant or "", compute)
    total = 0 if trains_model else int(facts.params("denoiser") * quant)
    large = family.large_text_encoders
    for part in facts.of_kind("text"):
        is_large = part.params >= LARGE_ENCODER or (large and len(facts.of_kind("text")) == 1) or part.name in ("t5xxl", "text_encoder_3")
        total += int(part.params * (quant if is_large else compute))
    vae = 4 if getattr(cfg, "no_half_vae", False) else compute
    return total + facts.params("vae") * vae


def _trained(cfg: Any, facts: MemoryFacts, trains_model: bool) -> tuple[int, int]:
    """(trained parameters, bytes each)."""
    if trains_model:
        half = getattr(cfg, "full_bf16", False) or getattr(cfg, "full_fp16", False)
        return facts.params("denoiser"), 2 if half else 4
    rank = int(getattr(cfg, "network_dim", None) or 4)
    return sum(rank * (rows + cols) for rows, cols in facts.linear_shapes if min(rows, cols) >= rank), 4


def _optimizer_states(cfg: Any) -> float:
    name = (getattr(cfg, "optimizer_type", None) or "AdamW").lower()
    if getattr(cfg, "use_8bit_adam", False):
        name = "adamw8bit"
    if name.startswith("sgd") and any("momentum" in str(a) for a in getattr(cfg, "optimizer_args", None) or []):
        return 1.0
    return next(states for pattern, states in OPTIMIZER_STATES if re.search(pattern, name))


def _activation_bytes(family: Any, facts: MemoryFacts, buckets: list[tuple[int, int, int]], settings: Settings, compute: int) -> int:
    scale = family.latent_scale if hasattr(family, "latent_scale") else 8
    largest = max((w * h * b for w, h, b in buckets), default=0) / scale**2
    elements = family.activation_factor * largest * math.sqrt(max(facts.params("denoiser"), 1))
    if settings.gradient_checkpointing:
        blocks = max(len(facts.block_params), 1)
        elements *= CHECKPOINTED_SHARE + 1 / blocks
    return int(elements * compute)


def _swapped_bytes(facts: MemoryFacts, settings: Settings, bytes_per_weight: float) -> int:
    if not settings.blocks_to_swap or not facts.block_params:
        return 0
    swapped = sorted(facts.block_params)[-settings.blocks_to_swap:]
    return int(sum(swapped) * bytes_per_weight)


# ------------------------------------------------------------------------------------------------ the budget


def parse_budget(text: str) -> int | None:
    """`12GB`, `12GiB`, `12g`, `8000MB` -> bytes; `auto` -> None (the device's own memory)."""
    if text.strip().lower() == "auto":
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(g|gb|gib|m|mb|mib)?\s*", text.lower())
    if not match:
        raise ValueError(f"--vram_budget {text}: expected a size such as 12GB, 7.5GiB or 8000MB, or auto")
    unit = match.group(2) or "gb"
    factor = {"g": 1e9, "gb": 1e9, "gib": GiB, "m": 1e6, "mb": 1e6, "mib": 2**20}[unit]
    return int(float(match.group(1)) * factor)


def candidate_settings(cfg: Any, family: Any, facts: MemoryFacts) -> list[Settings]:
    """Every combination the run may use, fastest first: block swap where the family swaps blocks, checkpointing,
    and the quantizations its precision allows (plain fp8 needs mixed precision, as --fp8_base); an option the
    command line gives (--blocks_to_swap, --gradient_checkpointing, --base_quant/--fp8_base) is kept."""
    blocks = len(facts.block_params)
    swaps = [0]
    if blocks > 1 and family.swaps_blocks(_Probe()):
        swaps += list(range(1, blocks - 1))
    quants: list[str | None] = [None, "fp8_scaled", "int8", "nf4"]
    if getattr(cfg, "mixed_precision", "no") != "no":
        quants.insert(1, "fp8")
    if getattr(cfg, "trains_model_weights", False):
        quants = [None]
    # what the command line sets itself stays as given: the budget chooses only the rest
    given = current_settings(cfg)
    swaps = [given.blocks_to_swap] if given.blocks_to_swap else swaps
    quants = [given.base_quant] if given.base_quant else quants
    checkpointing = (True,) if given.gradient_checkpointing else (False, True)
    combos = [Settings(s, c, q) for s, c, q in product(swaps, checkpointing, quants)]
    return sorted(combos, key=lambda s: s.slowdown(blocks))


class _Probe:
    blocks_to_swap = 1


def choose_for_budget(cfg: Any, family: Any, facts: MemoryFacts, buckets: list[tuple[int, int, int]], budget: int, *,
                      on_gpu: bool, host_now: int) -> tuple[Settings | None, MemoryEstimate, str]:
    """The fastest settings whose device estimate fits `budget`, its estimate and why; None when nothing fits."""
    best = None
    for settings in candidate_settings(cfg, family, facts):
        estimate = estimate_memory(cfg, family, facts, buckets, on_gpu=on_gpu, host_now=host_now, settings=settings)
        if best is None or estimate.device < best[1].device:
            best = (settings, estimate)
        if estimate.device <= budget:
            why = (f"--vram_budget {budget / GiB:.2f} GiB: chose {settings.describe()} (estimated peak "
                   f"{estimate.device / GiB:.2f} GiB; about {settings.slowdown(len(facts.block_params)):.2f}x the step time "
                   "of no savings, the fastest combination that fits)")
            return settings, estimate, why
    assert best is not None
    return None, best[1], (f"--vram_budget {budget / GiB:.2f} GiB: nothing fits; the smallest estimate is "
                           f"{best[1].device / GiB:.2f} GiB with {best[0].describe()} (lower the resolution or batch size)")


def apply_settings(cfg: Any, settings: Settings) -> None:
    """Set the chosen options on the run's options (before anything loads)."""
    cfg.blocks_to_swap = settings.blocks_to_swap or None
    cfg.gradient_checkpointing = settings.gradient_checkpointing or cfg.gradient_checkpointing
    if settings.base_quant == "fp8":
        cfg.fp8_base = True
    cfg.base_quant = settings.base_quant


__all__ = ["MemoryEstimate", "Settings", "apply_settings", "choose_for_budget", "estimate_memory", "parse_budget"]


# ------------------------------------------------------------------------------------------------ in a run


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_resident_bytes() -> int:
    """This process's peak resident memory so far (Linux /proc VmHWM; 0 elsewhere)."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measured_line(device: Any) -> str:
    """The run's measured peaks, logged at its end beside the plan's estimate: peak allocated on a GPU (PyTorch's
    allocator, what the estimate counts) and the process's peak resident memory."""
    import torch

    host = f"{peak_resident_bytes() / GiB:.2f} GiB host RAM"
    if getattr(device, "type", str(device)) == "cuda":
        return f"memory (measured) peak {torch.cuda.max_memory_allocated(device) / GiB:.2f} GiB cuda, {host}"
    return f"memory (measured) peak {host} (training on the CPU)"


def dataset_buckets(dataset: Any) -> list[tuple[int, int, int]]:
    """(width, height, batch size) of every bucket the dataset fills."""
    summary = dataset.summary()
    batch = {part.index: part.batch_size for part in summary.datasets}
    return [(*row.resolution, batch.get(row.dataset_index, 1)) for row in summary.buckets]


def plan_memory(cfg: Any, family: Any, dataset: Any, problems: list[str]) -> list[str]:
    """The plan's memory lines; with --vram_budget the chosen memory options are set on `cfg` first (a budget
    nothing fits is a problem)."""
    import torch

    on_gpu = torch.cuda.is_available()
    try:
        facts = family.memory_facts(cfg)
    except (OSError, ValueError) as error:  # an unreadable model is reported when it loads
        return [f"  memory (estimate) not available: {error}"]
    buckets, host_now = dataset_buckets(dataset), resident_bytes()
    lines = []
    if getattr(cfg, "vram_budget", None):
        try:
            budget = parse_budget(cfg.vram_budget)
        except ValueError as error:
            problems.append(str(error))
            return []
        if budget is None:
            if not on_gpu:
                problems.append("--vram_budget auto reads the GPU's memory; on the CPU give a size (e.g. 12GB)")
                return []
            budget = int(torch.cuda.mem_get_info()[1] * 0.95)  # the driver and other processes keep some
        settings, _, why = choose_for_budget(cfg, family, facts, buckets, budget, on_gpu=on_gpu, host_now=host_now)
        if settings is None:
            problems.append(why)
            return []
        apply_settings(cfg, settings)
        lines.append(f"  {why}")
    estimate = estimate_memory(cfg, family, facts, buckets, on_gpu=on_gpu, host_now=host_now)
    return estimate.lines("cuda" if on_gpu else "cpu") + lines
