"""`--compile`: torch.compile on each block of the denoiser's block lists (`--torch_compile`, sd-scripts' option,
compiles the whole denoiser instead: training/setup.py).

Blocks, not the whole model: every block of a list shares its code, so one compiled graph serves them all (a
whole-model compile would trace 57 FLUX blocks into one graph); block swap's hooks and gradient checkpointing
stay outside the compiled code (the block's `forward` is compiled, not its `__call__` with the hooks); and the
adapters' patched forwards of the block's layers are traced into the block's graph, so compiling happens once
the trained modules are attached.

Shapes are dynamic (`dynamic=True`, whatever `--dynamo_dynamic` says): a new bucket resolution reuses the graph
instead of compiling one per bucket. `--dynamo_backend` (default inductor), `--dynamo_mode` and
`--dynamo_fullgraph` are passed on. Recompilations
are bounded (`RECOMPILE_LIMIT` per block's code: past it the block runs eagerly, with PyTorch's warning) and
counted: the run's log reports the graphs compiled and the recompilations at its end.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("lorakit")

RECOMPILE_LIMIT = 8


class CompiledBlocks:
    """The compiled blocks of a run and the compiler's counts since they were compiled."""

    def __init__(self, blocks: list[torch.nn.Module]):
        from torch._dynamo.utils import counters

        self.blocks = blocks
        self._start = (counters["stats"]["unique_graphs"], sum(counters["recompiles"].values()))

    def graphs(self) -> int:
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"] - self._start[0]

    def recompiles(self) -> int:
        from torch._dynamo.utils import counters

        return sum(counters["recompiles"].values()) - self._start[1]

    def report(self) -> str:
        return (f"--compile: {len(self.blocks)} blocks compiled; {self.graphs()} graphs, {self.recompiles()} "
                f"recompilations (at most {RECOMPILE_LIMIT} per block's code)")


def compile_blocks(cfg: Any, family: Any, comps: Any) -> CompiledBlocks | None:
    """Compile each block of `family.denoiser_blocks(comps)` in place (None without --compile)."""
    if not getattr(cfg, "compile", False):
        return None
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    options = {"backend": (getattr(cfg, "dynamo_backend", None) or "inductor").lower(), "dynamic": True,
               "fullgraph": bool(getattr(cfg, "dynamo_fullgraph", False))}
    if getattr(cfg, "dynamo_mode", None):
        options["mode"] = cfg.dynamo_mode
    blocks = [block for blocks in family.denoiser_blocks(comps) for block in blocks]
    for block in blocks:
        block.forward = torch.compile(block.forward, **options)
    compiled = CompiledBlocks(blocks)
    log.info("--compile: %d blocks of the denoiser compiled (%s backend, dynamic shapes)", len(blocks), options["backend"])
    return compiled
