"""LoRA files of the BFL-layout families (FLUX.1, Chroma, FLUX.2): kohya/BFL layout <-> diffusers/PEFT, both ways.

kohya (`networks.lora_flux`) names BFL layers, so one factor pair covers a fused layer: `img_attn.qkv` =
[to_q; to_k; to_v], `txt_attn.qkv` = [add_q_proj; add_k_proj; add_v_proj], a FLUX.1 single block's `linear1` =
[to_q; to_k; to_v; proj_mlp]. diffusers' pipelines name the diffusers layers
(`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`). Each family gives its layer table (kohya name ->
the diffusers paths stacked in it, the trainer's own), so both directions agree with training.

* Splitting a fused pair (down D, up U): every part gets the same D and its rows of U — exact. An up that is
  block-diagonal over the parts (one independent LoRA per part, saved at rank k·r) is split into the small
  pairs it is made of instead.
* Fusing parts back: parts sharing one A give (A, [B_1; …; B_k]) — exact, and the inverse of the split; parts
  with different A's give the block-diagonal form at the summed rank with the A's stacked, each B scaled so
  every part keeps its own scale under the one alpha of the fused module — exact in ΔW.
* Alpha: folded into lora_B by default (PEFT assumes alpha = rank); with `keep_alpha` the factors are copied
  bit for bit and `<path>.alpha` is written beside them, which this reader takes back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from lorakit.adapters.key_layout import KeyLayout
from lorakit.errors import CheckpointError
from lorakit.families.common import bfl_keys
from lorakit.families.common.t5_lora_names import t5_file_path, t5_module_path

__all__ = ["BflLoraConverter"]

_BLOCK = re.compile(r"lora_unet_(double|single)_blocks_(\d+)_")
_PATH_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def _block_counts(indices: list[tuple[str, int]]) -> tuple[int, int]:
    double = max((i + 1 for kind, i in indices if kind in ("double", "transformer_blocks")), default=0)
    single = max((i + 1 for kind, i in indices if kind in ("single", "single_transformer_blocks")), default=0)
    return double, single


def _group(state: Mapping[str, torch.Tensor], split) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, role = split(key)
        modules.setdefault(name, {})[role] = value
    return modules


def _split_sizes(parts: int, rows: int, width: int) -> list[int]:
    return bfl_keys.fused_split_sizes(parts, rows, width) if parts > 1 else [rows]


# ---------------------------------------------------------------------------------------------------------
# kohya -> diffusers
# ---------------------------------------------------------------------------------------------------------


def _kohya_role(key: str) -> tuple[str, str]:
    name, _, suffix = key.partition(".")
    role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(suffix)
    if role is None:
        raise CheckpointError(f"key {key} is not a LoRA tensor (lora_down.weight, lora_up.weight or alpha)")
    return name, role


def _block_diagonal_columns(up: torch.Tensor, sizes: list[int]) -> list[slice] | None:
    """The rank columns of each part when `up` is block-diagonal over the parts' rows (and not all zero)."""
    parts, rank = len(sizes), up.shape[1]
    if parts < 2 or rank % parts or not bool(up.any()):
        return None
    width = rank // parts
    columns = [slice(j * width, (j + 1) * width) for j in range(parts)]
    start = 0
    for size, own in zip(sizes, columns):
        rows = up[start:start + size]
        outside = torch.cat([rows[:, : own.start], rows[:, own.stop:]], dim=1)
        if bool(outside.any()):
            return None
        start += size
    return columns


def _split(down: torch.Tensor, up: torch.Tensor, alpha: float, parts: int, paths: list[str]):
    """(path, A, B, alpha) per part of a (possibly fused) kohya module; each part keeps the module's scale."""
    if parts == 1:
        return [(paths[0], down, up, alpha)]
    sizes = _split_sizes(parts, up.shape[0], down.shape[1])
    rows = torch.split(up, sizes, dim=0)
    columns = _block_diagonal_columns(up, sizes)
    if columns is None:
        return [(path, down, b, alpha) for path, b in zip(paths, rows)]
    # k independent rank-r LoRAs saved at rank k·r: each keeps scale alpha/(k·r) = (alpha/k)/r
    return [(path, down[cols], b[:, cols], alpha / parts) for path, b, cols in zip(paths, rows, columns)]


# ---------------------------------------------------------------------------------------------------------
# diffusers -> kohya
# ---------------------------------------------------------------------------------------------------------


def _peft_role(key: str) -> tuple[str, str]:
    key = key.removeprefix("base_model.model.").replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    for suffix, role in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".alpha", "alpha")):
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    raise CheckpointError(f"key {key} is not a PEFT LoRA tensor (<module>.lora_A.weight, .lora_B.weight or .alpha)")


def _alpha(tensors: dict[str, torch.Tensor]) -> float:
    return float(tensors["alpha"]) if "alpha" in tensors else float(tensors["down"].shape[0])


def _fuse(parts: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One (down, up, alpha) for the parts of a fused layer, exact in every part's ΔW."""
    downs, ups = [p["down"] for p in parts], [p["up"] for p in parts]
    scales = [_alpha(p) / p["down"].shape[0] for p in parts]
    if all(torch.equal(d, downs[0]) for d in downs):
        rank = downs[0].shape[0]
        if all(s == scales[0] for s in scales):
            return downs[0], torch.cat(ups, dim=0), _alpha(parts[0])
        ups = [(u.float() * (s / scales[0])).to(u.dtype) for u, s in zip(ups, scales)]
        return downs[0], torch.cat(ups, dim=0), scales[0] * rank
    # independent pairs: block-diagonal up over the stacked downs; one alpha whose scale is the first part's
    total = sum(d.shape[0] for d in downs)
    scale = scales[0]
    up = torch.zeros(sum(u.shape[0] for u in ups), total, dtype=ups[0].dtype)
    row = col = 0
    for u, s in zip(ups, scales):
        block = u if s == scale else (u.float() * (s / scale)).to(u.dtype)
        up[row:row + u.shape[0], col:col + u.shape[1]] = block
        row, col = row + u.shape[0], col + u.shape[1]
    return torch.cat(downs, dim=0), up, scale * total


def _kohya_tensors(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    return {
        f"{name}.lora_down.weight": down.contiguous(),
        f"{name}.lora_up.weight": up.contiguous(),
        f"{name}.alpha": torch.tensor(alpha, dtype=torch.float32),
    }


@dataclass(frozen=True)
class BflLoraConverter:
    """One family's converter: `layer_table(num_double, num_single)` gives kohya name -> the diffusers paths (under
    the transformer) stacked in it, in order; text-encoder modules (`text_prefixes`, e.g. `lora_te1`) are named
    through the family's `layout`, T5's (`t5_prefix`) under ComfyUI's name (`common/t5_lora_names.py`); `title`
    names the model in messages."""

    layer_table: Callable[[int, int], dict[str, tuple[str, ...]]]
    text_prefixes: tuple[str, ...]
    layout: KeyLayout
    title: str
    t5_prefix: str | None = None

    def _file_path(self, name: str) -> str | None:
        """The diffusers-layout path of a text-encoder module's kohya name."""
        path = self.layout.kohya_to_path(name)
        if path is not None and self.t5_prefix and name.startswith(f"{self.t5_prefix}_"):
            return t5_file_path(path.partition(".")[2])
        return path

    def _kohya_name(self, path: str) -> str | None:
        """The kohya name of a text-encoder module's diffusers-layout path (both T5 spellings read)."""
        inner = t5_module_path(path)
        if inner is not None and self.t5_prefix:
            path = f"{self.layout.components[self.t5_prefix]}.{inner}"
        return self.layout.path_to_kohya(path)

    def kohya_to_diffusers(
        self, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, keep_alpha: bool = False
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """A kohya LoRA as PEFT keys (alpha folded into lora_B, or kept as `.alpha` with `keep_alpha`)."""
        modules = _group(state, _kohya_role)
        counts = _block_counts([(m[1], int(m[2])) for name in modules if (m := _BLOCK.match(name))])
        table = self.layer_table(*counts)
        out: dict[str, torch.Tensor] = {}
        for name, tensors in modules.items():
            if "down" not in tensors or "up" not in tensors:
                raise CheckpointError(f"module {name} has no {'lora_down' if 'down' not in tensors else 'lora_up'} weight")
            down, up = tensors["down"], tensors["up"]
            rank = down.shape[0]
            alpha = float(tensors["alpha"]) if "alpha" in tensors else float(rank)
            if name in table:
                paths = [f"transformer.{p}" for p in table[name]]
            elif name.startswith(tuple(f"{p}_" for p in self.text_prefixes)) and (path := self._file_path(name)):
                paths = [path]
            else:
                raise CheckpointError(f"key {name}.lora_down.weight is not a {self.title} LoRA module")
            for path, a, b, part_alpha in _split(down, up, alpha, len(paths), paths):
                if keep_alpha:
                    out[f"{path}.alpha"] = torch.tensor(part_alpha, dtype=torch.float32)
                elif part_alpha != a.shape[0]:
                    # fold in float32 (at least) and return to the file's dtype, so half-precision files stay half
                    b = (b.to(torch.promote_types(b.dtype, torch.float32)) * (part_alpha / a.shape[0])).to(b.dtype)
                out[f"{path}.lora_A.weight"] = a.contiguous().clone()  # q, k and v may share one down matrix
                out[f"{path}.lora_B.weight"] = b.contiguous()
        return out, dict(metadata or {})

    def diffusers_to_kohya(
        self, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """A PEFT-layout LoRA as kohya keys (fused BFL modules); alpha from `.alpha` keys, else rank."""
        pairs = _group(state, _peft_role)
        counts = _block_counts([(m[1], int(m[2])) for path in pairs if (m := _PATH_BLOCK.search(path))])
        owner = {f"transformer.{p}": (name, index) for name, parts in self.layer_table(*counts).items() for index, p in enumerate(parts)}
        fused: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        out: dict[str, torch.Tensor] = {}
        for path, tensors in pairs.items():
            if "down" not in tensors or "up" not in tensors:
                raise CheckpointError(f"module {path} has only one of lora_A / lora_B")
            if path in owner:
                name, index = owner[path]
                fused.setdefault(name, {})[index] = tensors
                continue
            name = self._kohya_name(path)
            if name is None or not name.startswith(self.text_prefixes):
                raise CheckpointError(f"key {path}.lora_A.weight is not a module of a {self.title} model")
            out.update(_kohya_tensors(name, tensors["down"], tensors["up"], _alpha(tensors)))
        table = self.layer_table(*counts)
        for name, parts in fused.items():
            if len(parts) != len(table[name]):
                missing = [p for i, p in enumerate(table[name]) if i not in parts]
                raise CheckpointError(f"module transformer.{missing[0]} is missing: {name} needs all of {', '.join(table[name])}")
            down, up, alpha = _fuse([parts[i] for i in range(len(parts))])
            out.update(_kohya_tensors(name, down, up, alpha))
        return out, dict(metadata or {})
