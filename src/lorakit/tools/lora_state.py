"""A LoRA state dict as a set of modules (down, up, alpha), read from kohya or diffusers/PEFT keys.

The tools work on `LoraFactors` keyed by kohya module name whatever layout the file uses, and write the
kohya layout back with `to_state_dict`. ΔW always comes from `lorakit.adapters.lora.lora_delta_weight`, the
same function the training modules use, so a tool and a trained network can never disagree on the math.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lorakit.adapters.lora import lora_delta_weight, lora_scale
from lorakit.errors import CheckpointError
from lorakit.adapters.key_layout import KeyLayout

__all__ = ["ALGORITHM_MARKERS", "LoraFactors", "detect_algorithm", "read_modules", "to_state_dict"]

KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
PEFT_SUFFIXES = {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha"}
# tensor-name fragments of adapters other than plain LoRA: these tools cannot refactor them
ALGORITHM_MARKERS = (
    ("hada_w1", "loha"),
    ("lokr_w1", "lokr"),
    ("oft_blocks", "oft"),
    ("oft_diag", "oft"),
    ("lora_mid", "locon-tucker"),
    ("dora_scale", "dora"),
    ("lora_magnitude_vector", "dora"),
    (".diff", "full"),
    ("w_norm", "norm"),
)


@dataclass
class LoraFactors:
    """One LoRA module: `down` (r, in[, kh, kw]), `up` (out, r[, 1, 1]) and `alpha` (None means rank)."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank)

    @property
    def alpha_value(self) -> float:
        """The effective alpha (rank when none is stored)."""
        return self.scale * self.rank

    @property
    def is_spatial(self) -> bool:
        """A conv with a kernel larger than 1x1 (LoRA-C3Lier); these get `--new_conv_rank`/`--conv_dim`."""
        return self.down.dim() == 4 and tuple(self.down.shape[2:]) != (1, 1)

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """ΔW = (alpha / rank) · up ∘ down in the layer's weight shape, computed in `dtype` (at least float32)."""
        down = self.down.to(device=device, dtype=dtype)
        up = self.up.to(device=device, dtype=dtype)
        return lora_delta_weight(down, up, self.alpha)


def _strip_peft_wrappers(key: str) -> str:
    """PEFT wrapper leaks seen in the wild: `base_model.model.` prefixes and `.default` adapter names."""
    key = key.removeprefix("base_model.model.")
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def _split_key(key: str, layout: KeyLayout) -> tuple[str, str, str] | None:
    """(kohya module name, role down/up/alpha, style kohya/peft) for one tensor key, else None."""
    for suffix, role in KOHYA_SUFFIXES.items():
        if key.endswith("." + suffix) and "." not in key[: -len(suffix) - 1]:
            return key[: -len(suffix) - 1], role, "kohya"
    key = _strip_peft_wrappers(key)
    for suffix, role in PEFT_SUFFIXES.items():
        if key.endswith("." + suffix):
            path = key[: -len(suffix) - 1]
            name = layout.path_to_kohya(path)
            if name is not None:
                return name, role, "peft"
    return None


def detect_algorithm(keys: list[str]) -> str:
    """`lora`, `locon` (3x3 convs present is decided from shapes elsewhere), or the adapter type named by
    its tensors (`loha`, `lokr`, `oft`, `dora`, ...)."""
    for marker, algorithm in ALGORITHM_MARKERS:
        if any(marker in key for key in keys):
            return algorithm
    return "lora"


def read_modules(
    state_dict: Mapping[str, torch.Tensor], layout: KeyLayout, *, source: str
) -> tuple[dict[str, LoraFactors], str]:
    """The LoRA modules of a state dict (kohya or diffusers/PEFT keys) and the layout style found.

    Every key must be a LoRA tensor, and every module needs both factors with matching ranks; otherwise
    `CheckpointError` names `source` and the key. kohya module names are taken as they are, whether or not this
    family's networks.lora trains that layer (LyCORIS presets name others; sd-scripts' resize_lora.py reads any);
    LyCORIS norm tensors (`w_norm`, `b_norm`) are left to the caller (`tools.file_modules`).
    """
    state_dict = {k: v for k, v in state_dict.items() if k.rpartition(".")[2] not in ("w_norm", "b_norm")}
    algorithm = detect_algorithm(list(state_dict))
    if algorithm != "lora":
        marker = next(k for k in state_dict if any(m in k for m, a in ALGORITHM_MARKERS if a == algorithm))
        raise CheckpointError(f"{source}: key {marker} belongs to a {algorithm} adapter; these tools handle plain LoRA only")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    styles: set[str] = set()
    for key, value in state_dict.items():
        split = _split_key(key, layout)
        if split is None:
            raise CheckpointError(f"{source}: key {key} is not a LoRA tensor of an {layout.family.upper()} module")
        name, role, style = split
        styles.add(style)
        parts.setdefault(name, {})[role] = value
    if len(styles) > 1:
        raise CheckpointError(f"{source}: the file mixes kohya and diffusers/PEFT keys")
    modules = {name: _module_from_parts(name, tensors, source) for name, tensors in parts.items()}
    return modules, styles.pop() if styles else "kohya"


def _module_from_parts(name: str, tensors: dict[str, torch.Tensor], source: str) -> LoraFactors:
    missing = [role for role in ("down", "up") if role not in tensors]
    if missing:
        raise CheckpointError(f"{source}: module {name} has no {' or '.join(missing)} weight")
    down, up = tensors["down"], tensors["up"]
    if down.dim() not in (2, 4) or up.dim() != down.dim() or down.shape[0] != up.shape[1]:
        raise CheckpointError(
            f"{source}: module {name} has factors of shapes down {tuple(down.shape)} and up {tuple(up.shape)}, "
            "which do not form a LoRA (down is rank x in, up is out x rank)"
        )
    alpha = tensors.get("alpha")
    if alpha is not None and alpha.numel() != 1:
        raise CheckpointError(f"{source}: key {name}.alpha holds {alpha.numel()} values, expected one")
    return LoraFactors(name, down, up, None if alpha is None else float(alpha.reshape(())))


def to_state_dict(modules: Mapping[str, LoraFactors]) -> dict[str, torch.Tensor]:
    """The kohya layout: `<name>.lora_down.weight`, `<name>.lora_up.weight` and a 0-d `<name>.alpha`."""
    state: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        state[f"{name}.lora_down.weight"] = module.down.contiguous()
        state[f"{name}.lora_up.weight"] = module.up.contiguous()
        state[f"{name}.alpha"] = torch.tensor(module.alpha_value, dtype=torch.float32)
    return state
