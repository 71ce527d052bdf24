"""sd-scripts' `networks.lora_sd3` `--network_args`: which MMDiT layers get LoRA, and at which rank.

Values arrive as strings, as in sd-scripts. Per-type ranks (`context_attn_dim`, `context_mlp_dim`,
`context_mod_dim`, `x_attn_dim`, `x_mlp_dim`, `x_mod_dim`) override `--network_dim` (0 skips that type;
`x_attn_dim` also covers SD3.5 Medium's second attention); `train_block_indices` keeps LoRA on some joint
blocks only; `emb_dims` (six numbers: context_embedder, t_embedder, x_embedder, y_embedder, final
modulation, final linear) adds the embedders. Only the literal `True` turns on `split_qkv` and `train_t5xxl`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lorakit.errors import ConfigError
from lorakit.families.common.network_args import (
    parse_indices,
    parse_int,
    parse_int_list,
)

TYPE_DIM_KEYS = ("context_attn_dim", "context_mlp_dim", "context_mod_dim", "x_attn_dim", "x_mlp_dim", "x_mod_dim")
KNOWN_KEYS = frozenset(
    {*TYPE_DIM_KEYS, "emb_dims", "train_block_indices", "split_qkv", "train_t5xxl", "verbose", "rank_dropout",
     "module_dropout", "conv_dim", "conv_alpha", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
     "loraplus_text_encoder_lr_ratio"}
)
#: keys of networks.lora (SD/SDXL) that name U-Net blocks the MMDiT does not have
FOREIGN_KEYS = frozenset({"block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                          "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold"})


@dataclass(frozen=True)
class SD3NetworkArgs:
    network_dim: int = 4
    type_dims: dict[str, int] = field(default_factory=dict)
    emb_dims: tuple[int, ...] | None = None
    block_indices: frozenset[int] | None = None  # None: all joint blocks
    split_qkv: bool = False
    train_t5xxl: bool = False

    @classmethod
    def parse(cls, kwargs: Mapping[str, str], network_dim: int) -> tuple["SD3NetworkArgs", list[str]]:
        """The keys (those the adapter algorithm leaves to the family) and every problem with them."""
        problems = [
            f"--network_args {k}: U-Net block options do not apply to the SD3 MMDiT; use train_block_indices"
            for k in kwargs if k in FOREIGN_KEYS
        ]
        problems += [
            f"--network_args {k}: not a networks.lora_sd3 option (known: {', '.join(sorted(KNOWN_KEYS))})"
            for k in kwargs if k not in KNOWN_KEYS and k not in FOREIGN_KEYS
        ]
        type_dims = {key.removesuffix("_dim"): parse_int(key, kwargs[key], problems) for key in TYPE_DIM_KEYS if key in kwargs}
        emb_dims = None
        if "emb_dims" in kwargs:
            emb_dims = parse_int_list("emb_dims", kwargs["emb_dims"], problems)
            if len(emb_dims) != 6:
                problems.append(
                    f"--network_args emb_dims={kwargs['emb_dims']}: needs 6 numbers "
                    "[context_embedder, t_embedder, x_embedder, y_embedder, final_mod, final_linear]"
                )
        blocks = parse_indices("train_block_indices", kwargs.get("train_block_indices"), problems)
        value = cls(network_dim, type_dims, emb_dims, blocks, kwargs.get("split_qkv") == "True",
                    kwargs.get("train_t5xxl") == "True")
        return value, problems

    def check_blocks(self, num_layers: int) -> None:
        """Block indices must exist in the loaded model (known only after loading)."""
        outside = sorted(i for i in (self.block_indices or ()) if i >= num_layers)
        if outside:
            raise ConfigError([
                f"--network_args train_block_indices: block {outside[0]} does not exist; this model has "
                f"joint blocks 0-{num_layers - 1}"
            ])

    def rank_for(self, lora_kind: str, block: int | None) -> int:
        """The rank of one block layer (0: no LoRA) from block indices and per-type dims."""
        if self.block_indices is not None and block is not None and block not in self.block_indices:
            return 0
        return self.type_dims.get(lora_kind, self.network_dim)
