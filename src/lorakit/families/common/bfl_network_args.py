"""sd-scripts' `networks.lora_flux` `--network_args`: which layers of a BFL-layout transformer (FLUX.1, Chroma)
get LoRA, and at which rank.

Values arrive as strings, as in sd-scripts. Per-type ranks (`img_attn_dim`, …, `single_mod_dim`) override
`--network_dim` (0 skips that type); `train_blocks` and `train_*_block_indices` choose blocks; `in_dims` adds
the input embedders; `split_qkv=True` trains one LoRA per part of the fused layers. Only the literal `True`
turns on boolean keys, as there.

`network_reg_dims` and `network_reg_lrs` (`"regex=value,regex=value"`) give the modules whose kohya name a regular
expression finds (`re.search`, the first matching pair wins) their own rank or learning rate. As in lora_flux, a
rank chosen so overrides the per-type ranks and the block indices but not `train_blocks` (which decides what is
a candidate at all), and 0 skips the module; it applies to the text encoders' modules too, and to the input
embedders when `in_dims` is given. `ggpo_sigma` with `ggpo_beta` switch on LoRA-GGPO (`adapters/ggpo.py`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from lorakit.families.common.network_args import (
    parse_indices,
    parse_int,
    parse_int_list,
)

TYPE_DIM_KEYS = ("img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim", "txt_mod_dim", "single_dim", "single_mod_dim")
#: keys this module reads (every key of lora_flux); others are refused
KNOWN_KEYS = frozenset(
    {*TYPE_DIM_KEYS, "train_blocks", "train_double_block_indices", "train_single_block_indices", "in_dims",
     "train_t5xxl", "split_qkv", "verbose", "rank_dropout", "module_dropout", "conv_dim", "conv_alpha",
     # LoRA+ (the network's optimizer groups read them)
     "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
     # ranks and learning rates by regular expression, LoRA-GGPO
     "network_reg_dims", "network_reg_lrs", "ggpo_sigma", "ggpo_beta"}
)

def parse_regex_pairs(key: str, value: str, kind: type, problems: list[str]) -> tuple[tuple[str, float], ...]:
    """lora_flux's `"regex=value,regex=value"`: (pattern, number) pairs in the order given. sd-scripts skips a
    malformed pair with a warning; here it is a problem, named with the key, as is a pattern that does not compile."""
    pairs: list[tuple[str, float]] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        pattern, separator, number = (part.strip() for part in item.partition("="))
        if not separator:
            problems.append(f"--network_args {key}: {item!r} is not regex=value")
            continue
        try:
            re.compile(pattern)
            pairs.append((pattern, kind(number)))
        except re.error as exc:
            problems.append(f"--network_args {key}: {pattern!r} is not a regular expression ({exc})")
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            problems.append(f"--network_args {key}: the value of {pattern!r} must be {what}, got {number!r}")
    return tuple(pairs)


def first_match(pairs: Sequence[tuple[str, float]], name: str) -> tuple[int, float] | None:
    """(index, value) of the first pair whose pattern `re.search`es `name`, as lora_flux picks it."""
    for index, (pattern, value) in enumerate(pairs):
        if re.search(pattern, name):
            return index, value
    return None


def _ggpo(kwargs: Mapping[str, str], problems: list[str]) -> tuple[float, float] | None:
    """(sigma, beta) when both are given (lora_flux turns GGPO on only then; one alone is a problem here)."""
    given = [key for key in ("ggpo_sigma", "ggpo_beta") if key in kwargs]
    if not given:
        return None
    if len(given) == 1:
        other = "ggpo_beta" if given[0] == "ggpo_sigma" else "ggpo_sigma"
        problems.append(f"--network_args {given[0]}: LoRA-GGPO needs {other} too (sd-scripts ignores one alone)")
        return None
    try:
        return float(kwargs["ggpo_sigma"]), float(kwargs["ggpo_beta"])
    except ValueError:
        problems.append(f"--network_args ggpo_sigma={kwargs['ggpo_sigma']} ggpo_beta={kwargs['ggpo_beta']}: must be numbers")
        return None


@dataclass(frozen=True)
class BflNetworkArgs:
    network_dim: int = 4
    type_dims: dict[str, int] = field(default_factory=dict)
    train_blocks: str = "all"
    double_indices: frozenset[int] | None = None  # None: all
    single_indices: frozenset[int] | None = None
    in_dims: tuple[int, ...] | None = None
    train_t5xxl: bool = False
    split_qkv: bool = False  # one LoRA per part of the fused qkv / linear1 layers
    reg_dims: tuple[tuple[str, int], ...] = ()  # network_reg_dims: (regex, rank), the first match wins
    reg_lrs: tuple[tuple[str, float], ...] = ()  # network_reg_lrs: (regex, learning rate)
    ggpo: tuple[float, float] | None = None  # (ggpo_sigma, ggpo_beta)

    @classmethod
    def parse(cls, kwargs: Mapping[str, str], network_dim: int) -> tuple["BflNetworkArgs", list[str]]:
        """The keys (those the adapter algorithm leaves to the family) and every problem with them."""
        problems = [f"--network_args {k}: not a networks.lora_flux option" for k in kwargs if k not in KNOWN_KEYS]
        type_dims: dict[str, int] = {}
        for key in TYPE_DIM_KEYS:
            if key in kwargs:
                type_dims[key.removesuffix("_dim")] = parse_int(key, kwargs[key], problems)
        train_blocks = kwargs.get("train_blocks", "all")
        if train_blocks not in ("all", "single", "double"):
            problems.append(f"--network_args train_blocks={train_blocks}: expected all, single or double")
        in_dims = None
        if "in_dims" in kwargs:
            in_dims = parse_int_list("in_dims", kwargs["in_dims"], problems)
            if len(in_dims) != 5:
                problems.append(f"--network_args in_dims={kwargs['in_dims']}: needs 5 numbers [img, time, vector, guidance, txt]")
        double = parse_indices("train_double_block_indices", kwargs.get("train_double_block_indices"), problems)
        single = parse_indices("train_single_block_indices", kwargs.get("train_single_block_indices"), problems)
        reg_dims = parse_regex_pairs("network_reg_dims", kwargs.get("network_reg_dims", ""), int, problems)
        reg_lrs = parse_regex_pairs("network_reg_lrs", kwargs.get("network_reg_lrs", ""), float, problems)
        value = cls(network_dim, type_dims, train_blocks, double, single, in_dims, kwargs.get("train_t5xxl") == "True",
                    kwargs.get("split_qkv") == "True", reg_dims, reg_lrs, _ggpo(kwargs, problems))
        return value, problems

    def reg_rank(self, name: str) -> int | None:
        """The rank `network_reg_dims` gives the module of kohya name `name` (None: no pattern finds it)."""
        match = first_match(self.reg_dims, name)
        return None if match is None else int(match[1])

    def rank_for(self, bfl_path: str, kind: str, name: str = "") -> int:
        """The rank of one block layer (0: no LoRA) from train_blocks, then network_reg_dims (by kohya `name`),
        then block indices and per-type dims."""
        block, index = bfl_path.split(".")[:2]
        is_double = block == "double_blocks"
        if self.train_blocks == ("single" if is_double else "double"):
            return 0
        chosen_by_name = self.reg_rank(name)
        if chosen_by_name is not None:
            return chosen_by_name
        chosen = self.double_indices if is_double else self.single_indices
        if chosen is not None and int(index) not in chosen:
            return 0
        return self.type_dims.get(kind, self.network_dim)

