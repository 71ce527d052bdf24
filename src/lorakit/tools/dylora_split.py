"""Split a DyLoRA file into fixed-rank LoRAs (sd-scripts' `networks/extract_lora_from_dylora.py`).

DyLoRA (`networks.dylora`, `adapters/dylora.py`) trains every leading sub-rank b (a multiple of `unit`) as a
LoRA of its own, ΔW_b = (alpha / b) · up[:, :b] · down[:b]. The rank-r LoRA is therefore the first r rows of
each down factor and the first r columns of each up factor with alpha unchanged (the stored scale becomes
alpha / r): no SVD, nothing refitted. A module whose rank is already at most r is kept as it is.

sd-scripts' `--unit u` writes every rank u, 2u, … below the file's rank as `<save_to>-{rank:04d}<ext>`;
`--new_rank r` writes the one rank r to `--save_to` itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from lorakit.errors import CheckpointError, ConfigError
from lorakit.tools.lora_state import LoraFactors

__all__ = ["check_rank", "dylora_unit", "max_rank", "split_metadata", "split_outputs", "split_ranks", "truncate_modules"]

logger = logging.getLogger("lorakit.tools")

DYLORA_MODULE = "networks.dylora"


def dylora_unit(metadata: Mapping[str, str], source: str) -> int | None:
    """The `unit` the file was trained with (None when its metadata does not say).

    A file whose metadata names another network module is refused: the leading ranks of a plain LoRA carry no
    special meaning (any permutation of its rank axis is the same LoRA), so truncating one is not a split —
    `lorakit lora resize` is the tool for that.

    A LyCORIS DyLoRA file (`lycoris.kohya` with `algo=dylora`) trains its rank in blocks of `block_size` (default
    4), its unit.
    """
    module = metadata.get("ss_network_module")
    if module is None:
        logger.warning("%s records no ss_network_module; treating it as a DyLoRA file", source)
        return None
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except ValueError:
        args = None
    args = args if isinstance(args, dict) else {}
    lycoris = module == "lycoris.kohya" and str(args.get("algo", "")).lower() == "dylora"
    if module != DYLORA_MODULE and not lycoris:
        raise CheckpointError(
            f"{source}: ss_network_module is {module}, not {DYLORA_MODULE} (or lycoris.kohya with algo=dylora); only "
            "DyLoRA files can be split by truncation (use `lorakit lora resize` to lower the rank of other LoRAs)"
        )
    unit = args.get("block_size", 4) if lycoris else args.get("unit", 1)  # each module's default
    try:
        return int(unit)
    except (TypeError, ValueError):
        return None


def max_rank(modules: Mapping[str, LoraFactors]) -> int:
    return max((m.rank for m in modules.values()), default=0)


def split_ranks(file_rank: int, unit: int) -> list[int]:
    """unit, 2·unit, … strictly below the file's rank (sd-scripts writes no copy of the full rank)."""
    if unit < 1:
        raise ConfigError([f"--unit {unit}: must be at least 1"])
    return list(range(unit, file_rank, unit))


def check_rank(rank: int, file_rank: int, unit: int | None, source: str) -> None:
    """A rank the file can give: at least 1, at most its rank, and a multiple of the trained unit."""
    problems = []
    if rank < 1:
        problems.append(f"--new_rank {rank}: must be at least 1")
    elif rank > file_rank:
        problems.append(f"--new_rank {rank}: {source} has rank {file_rank}; a split can only lower the rank")
    elif unit and rank % unit:
        problems.append(
            f"--new_rank {rank}: {source} was trained with unit={unit}, so only multiples of {unit} are trained sub-ranks"
        )
    if problems:
        raise ConfigError(problems)


def truncate_modules(modules: Mapping[str, LoraFactors], rank: int) -> dict[str, LoraFactors]:
    """Every module cut to its first `rank` components, alpha unchanged (so the scale is alpha / rank)."""
    result: dict[str, LoraFactors] = {}
    for name, module in modules.items():
        keep = min(rank, module.rank)
        # alpha_value, not alpha: a file without alpha means alpha = the *original* rank, which must survive
        result[name] = LoraFactors(
            name, module.down[:keep].contiguous(), module.up[:, :keep].contiguous(), module.alpha_value
        )
    return result


def split_metadata(metadata: Mapping[str, str], file_rank: int, rank: int) -> dict[str, str]:
    """The input's metadata with the new dim (and conv_dim), and the split noted in `ss_training_comment`."""
    updated = dict(metadata)
    note = f"split from DyLoRA, rank {file_rank} to {rank}"
    comment = metadata.get("ss_training_comment")
    updated["ss_training_comment"] = f"{note}; {comment}" if comment else note
    updated["ss_network_dim"] = str(rank)
    try:
        args = json.loads(metadata.get("ss_network_args") or "null")
    except ValueError:
        args = None
    if isinstance(args, dict) and "conv_dim" in args:
        args["conv_dim"] = str(min(rank, int(float(args["conv_dim"]))))
        updated["ss_network_args"] = json.dumps(args)
    return updated


def split_outputs(save_to: Path, ranks: list[int]) -> list[tuple[int, Path]]:
    """sd-scripts' names for the split files: `name-0004.safetensors` for rank 4."""
    return [(rank, save_to.with_name(f"{save_to.stem}-{rank:04d}{save_to.suffix}")) for rank in ranks]
