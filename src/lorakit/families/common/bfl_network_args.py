"""sd-scripts' `networks.lora_flux` `--network_args`: which layers of a BFL-layout transformer (FLUX.1, Chroma)
get LoRA, and at which rank.

Values arrive as strings, as in sd-scripts. Per-type ranks (`img_attn_dim`, …, `single_mod_dim`) override
`--network_dim` (0 skips that type); `train_blocks` and `train_*_block_indices` choose blocks; `in_dims` adds
the input embedders; `split_qkv=True` trains one LoRA per part of the fused layers. Only the literal `True`
turns on boolean keys, as there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lorakit.families.common.network_args import (
    parse_indices,
    parse_int,
    parse_int_list,
)

TYPE_DIM_KEYS = ("img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim", "txt_mod_dim", "single_dim", "single_mod_dim")
#: keys this module reads; others that lora_flux knows are refused with a message, unknown ones too
KNOWN_KEYS = frozenset(
    {*TYPE_DIM_KEYS, "train_blocks", "train_double_block_indices", "train_single_block_indices", "in_dims",
     "train_t5xxl", "split_qkv", "verbose", "rank_dropout", "module_dropout", "conv_dim", "conv_alpha",
     # LoRA+ (the network's optimizer groups read them)
     "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"}
)
NOT_YET = {
    "network_reg_dims": "ranks chosen by regular expression are not implemented yet in lorakit; remove it and set "
                        "ranks per layer type (img_attn_dim=…, single_dim=…) and block (train_*_block_indices)",
    "network_reg_lrs": "learning rates chosen by regular expression are not implemented yet in lorakit; remove it",
    "ggpo_sigma": "LoRA-GGPO is not implemented yet in lorakit; remove ggpo_sigma and ggpo_beta",
    "ggpo_beta": "LoRA-GGPO is not implemented yet in lorakit; remove ggpo_sigma and ggpo_beta",
}


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

    @classmethod
    def parse(cls, kwargs: Mapping[str, str], network_dim: int) -> tuple["BflNetworkArgs", list[str]]:
        """The keys (those the adapter algorithm leaves to the family) and every problem with them."""
        problems = [f"--network_args {k}: {NOT_YET[k]}" for k in kwargs if k in NOT_YET]
        problems += [f"--network_args {k}: not a networks.lora_flux option" for k in kwargs if k not in KNOWN_KEYS and k not in NOT_YET]
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
        value = cls(network_dim, type_dims, train_blocks, double, single, in_dims, kwargs.get("train_t5xxl") == "True",
                    kwargs.get("split_qkv") == "True")
        return value, problems

    def rank_for(self, bfl_path: str, kind: str) -> int:
        """The rank of one block layer (0: no LoRA) from train_blocks, block indices and per-type dims."""
        block, index = bfl_path.split(".")[:2]
        is_double = block == "double_blocks"
        if self.train_blocks == ("single" if is_double else "double"):
            return 0
        chosen = self.double_indices if is_double else self.single_indices
        if chosen is not None and int(index) not in chosen:
            return 0
        return self.type_dims.get(kind, self.network_dim)

