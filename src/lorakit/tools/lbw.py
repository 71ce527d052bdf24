"""Layer-block weights (LBW) for merging LoRAs: `--lbws "[1,0,1,…]"`, one list per merged file
(sd-scripts' `svd_merge_lora.py` / `sdxl_merge_lora.py`).

Each list scales the ΔW of the modules in chosen U-Net blocks (and of the text encoders) before the files are
summed: ΔW_m = Σ_i ratio_i · lbw_i(block(m)) · ΔW_i,m. The lists follow the LoRA Block Weight convention of
26 slots — BASE (the text encoders), IN00…IN11, MID, OUT00…OUT11 — and a list of fewer entries fills a fixed
subset of them (the blocks that hold LoRA modules in common setups); every other slot keeps weight 1:

* SD 1.x/2.x: 17 entries (BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03…OUT11) or all 26;
* SDXL: 12 entries (BASE, IN04, IN05, IN07, IN08, MID, OUT00…OUT05) or 20 (BASE, IN00…IN08, MID, OUT00…OUT08).

Each family's `BlockLayout` says which lengths it takes and which slots they fill. sd-scripts decides SD or SDXL
from the list's length, so an SD list of 12 entries silently weights nothing; here the family comes from the file
and a list of the wrong length is refused. Families without blocks (DiTs) have no LBW convention (sd-scripts'
merge tools for them take none), so they are refused too.

The weighting is done on the inputs: every module is scaled (its up factor times w) or, at w = 0, left out
of that file, so the existing merge modes (`same`, `concat`, SVD) need no change and a block weighted 0 in
every file is absent from the result.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from lorakit.adapters.blocks import LBW_SLOTS
from lorakit.errors import ConfigError
from lorakit.families.base import ModelFamily
from lorakit.families.registry import all_families
from lorakit.tools.common import LoadedLora
from lorakit.tools.lora_state import LoraFactors

__all__ = ["LBW_SLOTS", "apply_block_weights", "lbw_slot", "parse_lbws", "slot_weights"]


def lbw_slot(module_name: str, family: ModelFamily) -> int | None:
    """The LBW slot (index into `LBW_SLOTS`) of a kohya module name, or None when no slot covers it.

    Text-encoder modules are BASE; denoiser modules map through their block (the numbering block-wise ranks use).
    """
    if module_name.startswith("lora_te"):
        return 0
    layout = family.block_layout
    index = None if layout is None else layout.block_index(module_name)
    return None if index is None else layout.lbw_slot_of(index)


def _lengths(family: ModelFamily) -> tuple[int, ...]:
    return tuple(family.block_layout.lbw_lengths) if family.block_layout is not None else ()


def _expected(family: ModelFamily) -> str:
    lengths = _lengths(family)
    if not lengths:
        with_blocks = sorted((f for f in all_families() if _lengths(f)), key=lambda f: f.title)
        supported = ", ".join(f"{f.title} ({' or '.join(map(str, _lengths(f)))} entries)" for f in with_blocks)
        return f"block weights exist for {supported} only"
    return f"a {family.title} LoRA takes {' or '.join(map(str, lengths))} entries"


def parse_lbws(texts: Sequence[str], files: Sequence[str], family: ModelFamily) -> list[list[float]]:
    """One list of numbers per file from JSON texts such as `"[1,0,1,…]"`; every mistake is reported at once."""
    if not _lengths(family):
        raise ConfigError([f"--lbws: the LoRAs are {family.title} LoRAs; {_expected(family)}"])

    if len(texts) != len(files):
        raise ConfigError([f"--lbws: {len(texts)} list(s) for {len(files)} file(s) in --models; give one list per file"])
    problems: list[str] = []
    lists: list[list[float]] = []
    for text, path in zip(texts, files):
        try:
            values = json.loads(text)
        except ValueError:
            values = None
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            problems.append(f"--lbws {text} (for {path}): expected a JSON list of numbers such as [1,0.5,0,...]")
            continue
        if len(values) not in _lengths(family):
            problems.append(f"--lbws (for {path}): {len(values)} entries; {_expected(family)}")
            continue
        lists.append([float(v) for v in values])
    if problems:
        raise ConfigError(problems)
    return lists


def slot_weights(lbw: Sequence[float], family: ModelFamily) -> list[float]:
    """The weight of each of the 26 slots: the list's entries on the slots it fills, 1.0 elsewhere."""
    filled = family.block_layout.lbw_lengths.get(len(lbw)) if family.block_layout is not None else None
    if filled is None:
        raise ConfigError([f"--lbws: {len(lbw)} entries; {_expected(family)}"])
    weights = [1.0] * len(LBW_SLOTS)
    for slot, value in zip(filled, lbw):
        weights[slot] = float(value)
    return weights


def _weighted(module: LoraFactors, weight: float) -> LoraFactors:
    """The module with ΔW multiplied by `weight` (on up, in float32, so alpha and rank keep their meaning)."""
    return LoraFactors(module.name, module.down, module.up.float() * weight, module.alpha)


def apply_block_weights(lora: LoadedLora, lbw: Sequence[float], family: ModelFamily | None = None) -> LoadedLora:
    """A copy of `lora` whose modules carry the block weights: scaled, or left out where the weight is 0."""
    family = family or lora.family
    weights = slot_weights(lbw, family)
    modules: dict[str, LoraFactors] = {}
    for name, module in lora.modules.items():
        slot = lbw_slot(name, family)
        weight = 1.0 if slot is None else weights[slot]
        if weight == 0.0:
            continue
        modules[name] = module if weight == 1.0 else _weighted(module, weight)
    return LoadedLora(lora.path, modules, lora.metadata, lora.style, lora.family)

