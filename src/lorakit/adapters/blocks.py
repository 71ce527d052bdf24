"""Block-wise ranks and learning rates of kohya's `networks.lora` (`--network_args block_dims=… down_lr_weight=…`).

A U-Net is cut into numbered blocks (sd-scripts inventory §4.3); a LoRA module's block follows from its kohya name
alone. A model family that has such blocks describes them with a `BlockLayout` (its numbering, how the
down/mid/up LR lists map onto it and how LoRA Block Weight lists fill the 26 LBW slots); everything here works on
that description and knows no family. Families without blocks (DiTs) have none, and block-wise settings are
refused for them.

Per-block LR weights come from `down_lr_weight`, `mid_lr_weight`, `up_lr_weight`, each a comma list or a preset
(`sine`, `cosine`, `linear`, `reverse_linear`, `zeros`, optionally `+base`). They are flattened into one weight
per block index; blocks whose weight is at most `block_lr_zero_threshold` get no modules at all.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lorakit.adapters.network import loraplus_split
from lorakit.adapters.targets import AdapterTarget, is_spatial_conv
from lorakit.errors import ConfigError

log = logging.getLogger("lorakit")

BLOCK_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
LR_WEIGHT_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")
#: the LoRA Block Weight convention's 26 slots: BASE (the text encoders), IN00…IN11, MID, OUT00…OUT11
LBW_SLOTS = ("BASE", *(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12)))


def lbw_slots(*names: str) -> tuple[int, ...]:
    """Slot indices of LBW slot names (`lbw_slots("BASE", "IN01")` -> (0, 2))."""
    return tuple(LBW_SLOTS.index(name) for name in names)


@dataclass(frozen=True)
class BlockLayout:
    """A U-Net's blocks: how many, how the down/mid/up LR lists map onto them, and how names find them.

    `block_of` gives the block of a kohya module name (None outside every block); `lycoris_block_of` the block
    of a module LyCORIS walks, from its diffusers path and its kohya name. `lbw_lengths` maps each accepted LoRA
    Block Weight list length to the LBW slots it fills, and `lbw_slot_of` a block index to its LBW slot.
    `lycoris_alternate` reads block lists of another length with another numbering (users copy SD 1.x's 25
    values into SDXL LyCORIS commands).
    """

    name: str
    num_blocks: int
    down: int  # entries of down_lr_weight
    mid: int
    up: int
    padded: bool  # blocks 0 and the last sit outside the lists and keep weight 1.0
    block_of: Callable[[str], int | None]
    lycoris_block_of: Callable[[str, str], int | None]
    lbw_lengths: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    lbw_slot_of: Callable[[int], int | None] = lambda index: None
    lycoris_alternate: "BlockLayout | None" = None

    def block_index(self, name: str) -> int | None:
        """The block of a kohya module name; only denoiser modules have one."""
        return self.block_of(name) if name.startswith("lora_unet_") else None


# ---------------------------------------------------------------------------------------------- LR weights


def preset_weights(spec: str, length: int, option: str) -> list[float] | None:
    """A preset such as `sine` or `cosine+.5` over `length` entries, or None when `spec` is not a preset.

    sine[i] = sin(π/2 · i/(N−1)) + base; cosine is sine reversed; linear[i] = i/(N−1) + base; reverse_linear is
    linear reversed; zeros = base.
    """
    name, _, base_text = spec.partition("+")
    if name not in PRESETS:
        return None
    try:
        base = float(base_text) if base_text else 0.0
    except ValueError:
        raise ConfigError([f"--network_args {option}={spec}: the part after '+' must be a number"]) from None
    if name == "zeros":
        return [base] * length
    if length < 2:
        raise ConfigError([f"--network_args {option}={spec}: a preset needs at least 2 entries; give a number"])
    ramp = [i / (length - 1) for i in range(length)]
    if name in ("sine", "cosine"):
        ramp = [math.sin(math.pi / 2 * r) for r in ramp]
    if name in ("cosine", "reverse_linear"):
        ramp.reverse()
    return [r + base for r in ramp]


def weight_list(spec: str, length: int, option: str) -> list[float]:
    """A comma list (empty entries are 0) padded with 1.0 or truncated to `length`, or a preset."""
    preset = preset_weights(spec.strip(), length, option)
    if preset is not None:
        return preset
    try:
        values = [float(item) if item.strip() else 0.0 for item in spec.split(",")]
    except ValueError:
        raise ConfigError([
            f"--network_args {option}={spec}: expected {length} comma-separated numbers or one of "
            f"{', '.join(PRESETS)} (optionally +base)"
        ]) from None
    if len(values) != length:
        log.warning("--network_args %s has %d values, the U-Net has %d; %s", option, len(values), length,
                    "the rest are 1.0" if len(values) < length else "the extra ones are ignored")
    return (values + [1.0] * length)[:length]


def block_lr_weights(kwargs: Mapping[str, str], layout: BlockLayout) -> list[float] | None:
    """One LR weight per block index (None when no *_lr_weight is given), zeroed at or below the threshold."""
    if not any(key in kwargs for key in LR_WEIGHT_KEYS):
        return None
    parts = []
    for key, length in zip(LR_WEIGHT_KEYS, (layout.down, layout.mid, layout.up)):
        parts.append(weight_list(kwargs[key], length, key) if key in kwargs else [1.0] * length)
    flat = parts[0] + parts[1] + parts[2]
    if layout.padded:
        flat = [1.0] + flat + [1.0]
    threshold = _number(kwargs, "block_lr_zero_threshold", 0.0)
    return [0.0 if w <= threshold else w for w in flat]


# ---------------------------------------------------------------------------------------------- ranks


@dataclass(frozen=True)
class BlockRanks:
    """Rank and alpha per block index for pointwise layers and (when given) for 3x3 convolutions."""

    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float] | None


def _number(kwargs: Mapping[str, str], key: str, default: float) -> float:
    if key not in kwargs:
        return default
    try:
        return float(kwargs[key])
    except ValueError:
        raise ConfigError([f"--network_args {key}={kwargs[key]}: must be a number"]) from None


def _per_block(kwargs: Mapping[str, str], key: str, layout: BlockLayout, cast: type) -> list[Any] | None:
    if key not in kwargs:
        return None
    items = [item.strip() for item in kwargs[key].split(",")]
    if len(items) != layout.num_blocks:
        raise ConfigError([
            f"--network_args {key}: needs exactly {layout.num_blocks} comma-separated values for this "
            f"U-Net ({layout.name}), got {len(items)}"
        ])
    try:
        return [cast(float(item)) for item in items]
    except ValueError:
        raise ConfigError([f"--network_args {key}={kwargs[key]}: every value must be a number"]) from None


def block_ranks(kwargs: Mapping[str, str], layout: BlockLayout, network_dim: int, network_alpha: float,
                lr_weights: list[float] | None) -> BlockRanks:
    """sd-scripts' `get_block_dims_and_alphas` then `remove_block_dims_and_alphas` (blocks without LR get 0)."""
    n = layout.num_blocks
    dims = _per_block(kwargs, "block_dims", layout, int) or [network_dim] * n
    alphas = _per_block(kwargs, "block_alphas", layout, float) or [network_alpha] * n
    conv_dims = _per_block(kwargs, "conv_block_dims", layout, int)
    conv_alphas = _per_block(kwargs, "conv_block_alphas", layout, float)
    if conv_dims is None and "conv_dim" in kwargs:
        conv_dims = [int(_number(kwargs, "conv_dim", 0))] * n
    if conv_dims is not None and conv_alphas is None:
        conv_alphas = [_number(kwargs, "conv_alpha", 1.0)] * n
    if lr_weights is not None:
        dims = [0 if w == 0 else d for d, w in zip(dims, lr_weights)]
        if conv_dims is not None:
            conv_dims = [0 if w == 0 else d for d, w in zip(conv_dims, lr_weights)]
    return BlockRanks(dims, alphas, conv_dims, conv_alphas)


def is_blockwise(kwargs: Mapping[str, str]) -> bool:
    """Block-wise ranks switch on with block_dims or any *_lr_weight, as in sd-scripts."""
    return "block_dims" in kwargs or any(key in kwargs for key in LR_WEIGHT_KEYS)


def apply_block_ranks(targets: Sequence[AdapterTarget], kwargs: Mapping[str, str], network_dim: int,
                      network_alpha: float, layout: BlockLayout | None) -> list[AdapterTarget]:
    """The targets with per-block rank/alpha; modules of blocks with rank 0 are left out.

    Text-encoder targets and U-Net modules outside any block keep their rank. Without block-wise arguments
    the targets are returned unchanged.
    """
    if not is_blockwise(kwargs):
        if any(key in kwargs for key in BLOCK_KEYS[1:]):
            log.warning("--network_args block_alphas/conv_block_* take effect only with block_dims or *_lr_weight")
        return list(targets)
    layout = require_layout(layout)
    ranks = block_ranks(kwargs, layout, network_dim, network_alpha, block_lr_weights(kwargs, layout))
    kept: list[AdapterTarget] = []
    for target in targets:
        index = layout.block_index(target.name)
        if index is None:
            kept.append(target)
            continue
        rank, alpha = _rank_for(target, index, ranks)
        if rank:
            kept.append(replace(target, rank=rank, alpha=alpha))
    return kept


def _rank_for(target: AdapterTarget, index: int, ranks: BlockRanks) -> tuple[int, float]:
    if is_spatial_conv(target.module):
        if ranks.conv_dims is None:
            return 0, 0.0  # with block_dims, 3x3 convs need conv_block_dims or conv_dim (as in sd-scripts)
        return ranks.conv_dims[index], ranks.conv_alphas[index]
    return ranks.dims[index], ranks.alphas[index]


def require_layout(layout: BlockLayout | None) -> BlockLayout:
    """The model's block layout, or the error for a model without blocks."""
    if layout is None:
        raise ConfigError([
            "--network_args block_dims/block_alphas/conv_block_*/*_lr_weight: block-wise settings need a U-Net "
            "with numbered blocks (as SD 1.x/2.x and SDXL have); this model's denoiser has none"
        ])
    return layout


# ---------------------------------------------------------------------------------------------- param groups


def blockwise_param_groups(network: Any, kwargs: Mapping[str, str], text_encoder_lr: float | None,
                           unet_lr: float | None, default_lr: float, loraplus: Mapping[str, float | None],
                           layout: BlockLayout | None) -> tuple[list[dict[str, Any]], list[str]] | None:
    """Optimizer groups with one U-Net group per block at lr·weight(block) (sd-scripts' block LR).

    Returns None when no *_lr_weight is given (the network's own grouping applies then). Text-encoder
    modules form one group as usual. LoRA+ splits every group into `lora_up` (lr·ratio, "… plus") and the
    rest; groups whose LR is 0 are dropped.
    """
    if not any(key in kwargs for key in LR_WEIGHT_KEYS):
        return None
    layout = require_layout(layout)
    weights = block_lr_weights(kwargs, layout)
    buckets: dict[str, tuple[list[Any], float, float | None]] = {}
    te_ratio = loraplus.get("loraplus_text_encoder_lr_ratio") or loraplus.get("loraplus_lr_ratio")
    unet_ratio = loraplus.get("loraplus_unet_lr_ratio") or loraplus.get("loraplus_lr_ratio")
    for name, module in network.lora_modules.items():
        if network.component_of(name) == "text_encoder":
            lr = default_lr if text_encoder_lr is None else text_encoder_lr
            key, ratio = "textencoder", te_ratio
        else:
            lr = default_lr if unet_lr is None else unet_lr
            index = layout.block_index(name)
            key, ratio = ("unet", unet_ratio) if index is None else (f"unet_block{index}", unet_ratio)
            lr = lr * (1.0 if index is None else weights[index])
        buckets.setdefault(key, ([], lr, ratio))[0].append(module)
    groups: list[dict[str, Any]] = []
    descriptions: list[str] = []
    for key, (modules, lr, ratio) in buckets.items():
        if not lr:
            continue
        for params, suffix, factor in loraplus_split(modules, ratio):
            if params:
                groups.append({"params": params, "lr": lr * factor})
                descriptions.append(key + suffix)
    return groups, descriptions


def loraplus_ratios(kwargs: Mapping[str, str]) -> dict[str, float | None]:
    """The three LoRA+ ratios from --network_args (None when absent)."""
    keys = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
    return {key: (_number(kwargs, key, 0.0) if key in kwargs else None) for key in keys}
