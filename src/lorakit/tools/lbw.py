"""Layer-block weights (LBW) for merging LoRAs: `--lbws "[1,0,1,…]"`, one list per merged file
(sd-scripts' `svd_merge_lora.py` / `sdxl_merge_lora.py`).

Each list scales the ΔW of the modules in chosen U-Net blocks (and of the text encoders) before the files are
summed: ΔW_m = Σ_i ratio_i · lbw_i(block(m)) · ΔW_i,m. The lists follow the LoRA Block Weight convention of
26 slots — BASE (the text encoders), IN00…IN11, MID, OUT00…OUT11 — and a list of fewer entries fills a fixed
subset of them (the blocks that hold LoRA modules in common setups); every other slot keeps weight 1:

* SD 1.x/2.x: 17 entries (BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03…OUT11) or all 26;
* SDXL: 12 entries (BASE, IN04, IN05, IN07, IN08, MID, OUT00…OUT05) or 20 (BASE, IN00…IN08, MID, OUT00…OUT08).

sd-scripts decides SD or SDXL from the list's length, so an SD list of 12 entries silently weights nothing;
here the family comes from the file (`guess_family`) and a list of the wrong length is refused. SD3 and FLUX
have no LBW convention (sd-scripts' merge tools for them take none), so they are refused too.

The weighting is done on the inputs: every module is scaled (its up factor times w) or, at w = 0, left out
of that file, so the existing merge modes (`same`, `concat`, SVD) need no change and a block weighted 0 in
every file is absent from the result.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from lorakit.adapters.blocks import sd_block_index, sdxl_block_index
from lorakit.errors import ConfigError
from lorakit.tools.common import LoadedLora
from lorakit.tools.lora_state import LoraFactors

__all__ = ["FILLED_SLOTS", "LBW_LENGTHS", "LBW_SLOTS", "apply_block_weights", "lbw_slot", "parse_lbws", "slot_weights"]

LBW_SLOTS = ("BASE", *(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12)))


def _slots(*names: str) -> tuple[int, ...]:
    return tuple(LBW_SLOTS.index(name) for name in names)


def _range(prefix: str, first: int, last: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i:02d}" for i in range(first, last + 1))


# which of the 26 slots a list of each length fills, in order (sd-scripts' LAYER12/17/20/26)
FILLED_SLOTS = {
    "sd": {
        17: _slots("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *_range("OUT", 3, 11)),
        26: tuple(range(len(LBW_SLOTS))),
    },
    "sdxl": {
        12: _slots("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *_range("OUT", 0, 5)),
        20: _slots("BASE", *_range("IN", 0, 8), "MID", *_range("OUT", 0, 8)),
    },
}
LBW_LENGTHS = {family: tuple(table) for family, table in FILLED_SLOTS.items()}
_FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX"}
_MID, _OUT00 = LBW_SLOTS.index("MID"), LBW_SLOTS.index("OUT00")


def lbw_slot(module_name: str, family: str) -> int | None:
    """The LBW slot (index into `LBW_SLOTS`) of a kohya module name, or None when no slot covers it.

    Text-encoder modules are BASE. U-Net modules reuse the block numbering of `adapters.blocks` (the one
    block-wise ranks use): for SD it is IN00…OUT11 without BASE, so the slot is one more; for SDXL the
    23 blocks number the middle block's three parts and the output blocks differently from LBW, which
    has one MID slot, OUT0N for output_blocks_N, IN00 for the time/label embeddings and OUT09 for `out`.
    """
    if module_name.startswith("lora_te"):
        return 0
    if not module_name.startswith("lora_unet_"):
        return None
    if family == "sd":
        index = sd_block_index(module_name)
        return None if index is None else index + 1
    if family == "sdxl":
        index = sdxl_block_index(module_name)
        if index is None:
            return None
        if index == 0:  # time_embed / label_emb
            return LBW_SLOTS.index("IN00")
        if index <= 9:  # input_blocks_N
            return index
        if index <= 12:  # middle_block_0..2
            return _MID
        return _OUT00 + (index - 13)  # output_blocks_N -> OUT0N, out_ -> OUT09
    return None


def _expected(family: str) -> str:
    lengths = LBW_LENGTHS.get(family)
    if lengths is None:
        supported = ", ".join(f"{_FAMILY_NAMES[f]} ({' or '.join(map(str, n))} entries)" for f, n in LBW_LENGTHS.items())
        return f"block weights exist for {supported} only"
    return f"a {_FAMILY_NAMES[family]} LoRA takes {' or '.join(map(str, lengths))} entries"


def parse_lbws(texts: Sequence[str], files: Sequence[str], family: str) -> list[list[float]]:
    """One list of numbers per file from JSON texts such as `"[1,0,1,…]"`; every mistake is reported at once."""
    if family not in LBW_LENGTHS:
        raise ConfigError([f"--lbws: the LoRAs are {_FAMILY_NAMES.get(family, family)} LoRAs; {_expected(family)}"])
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
        if len(values) not in LBW_LENGTHS[family]:
            problems.append(f"--lbws (for {path}): {len(values)} entries; {_expected(family)}")
            continue
        lists.append([float(v) for v in values])
    if problems:
        raise ConfigError(problems)
    return lists


def slot_weights(lbw: Sequence[float], family: str) -> list[float]:
    """The weight of each of the 26 slots: the list's entries on the slots it fills, 1.0 elsewhere."""
    filled = FILLED_SLOTS[family].get(len(lbw))
    if filled is None:
        raise ConfigError([f"--lbws: {len(lbw)} entries; {_expected(family)}"])
    weights = [1.0] * len(LBW_SLOTS)
    for slot, value in zip(filled, lbw):
        weights[slot] = float(value)
    return weights


def _weighted(module: LoraFactors, weight: float) -> LoraFactors:
    """The module with ΔW multiplied by `weight` (on up, in float32, so alpha and rank keep their meaning)."""
    return LoraFactors(module.name, module.down, module.up.float() * weight, module.alpha)


def apply_block_weights(lora: LoadedLora, lbw: Sequence[float], family: str | None = None) -> LoadedLora:
    """A copy of `lora` whose modules carry the block weights: scaled, or left out where the weight is 0."""
    family = family or lora.layout.family
    weights = slot_weights(lbw, family)
    modules: dict[str, LoraFactors] = {}
    for name, module in lora.modules.items():
        slot = lbw_slot(name, family)
        weight = 1.0 if slot is None else weights[slot]
        if weight == 0.0:
            continue
        modules[name] = module if weight == 1.0 else _weighted(module, weight)
    return LoadedLora(lora.path, modules, lora.metadata, lora.style, lora.layout)

