"""Dividing one epoch's batches among the processes of a multi-process (DDP) run.

Every process forms the same epoch order (it depends only on the seed and the epoch) and keeps the batches
at positions `rank, rank + world, rank + 2·world, …`. Optimizer step k of an N-process run therefore sees
the global batches kN … kN+N−1, the same batches a single process sees in step k with N accumulation steps,
and a run's data does not depend on how many processes share it beyond that grouping.

When the batch count does not divide by the number of processes, the list is padded with batches from its
start (as torch's `DistributedSampler` and accelerate's `even_batches` do): every process must run the same
number of steps, or the gradient all-reduce of the last step would wait forever for the process without one.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, TypeVar

T = TypeVar("T")


def batches_per_process(total: int, world_size: int) -> int:
    """How many batches each process gets from an epoch of `total` (the padded share)."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, not {world_size}")
    return -(-total // world_size)


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Process `rank`'s share of `items`: every `world_size`-th item, padded from the start to equal lengths."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if world_size == 1 or not items:
        return list(items)
    padded = list(items)
    needed = batches_per_process(len(items), world_size) * world_size
    while len(padded) < needed:  # a loop, because there may be fewer items than processes
        padded += list(items[: needed - len(padded)])
    return padded[rank::world_size]


def shard_batch_plans(plans: Sequence[T], rank: int, world_size: int) -> list[T]:
    """`shard` for dataset batch plans, renumbering each kept plan's `index` to its position in the share.

    The index is what the dataset counts micro-steps with (token warm-up), so it must count this process's
    batches; each plan keeps its own seed, so a batch is augmented the same way whichever process loads it.
    """
    kept = shard(plans, rank, world_size)
    if world_size == 1:
        return kept
    return [dataclasses.replace(plan, index=position) for position, plan in enumerate(kept)]
