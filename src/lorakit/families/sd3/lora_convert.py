"""SD3 LoRA files: kohya/SAI layout <-> diffusers/PEFT layout, both ways.

kohya (`networks.lora_sd3`): `lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight` / `.lora_up.weight` /
`.alpha`, one factor pair per fused SAI layer, scale alpha / rank. diffusers and A1111 read SD3 LoRAs only as
PEFT keys on diffusers module paths (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`), with q/k/v
apart and no alpha (they assume alpha = rank), so the scale is folded into `lora_B` here.

A fused qkv pair (down D, up U = [U_q; U_k; U_v]) becomes three pairs sharing D; an up that is block-diagonal
(sd-scripts' `split_qkv` layout) is split into the three small pairs it is made of. The other way, three pairs
with the same A become one fused pair again; different A's become the block-diagonal form. Rows of the
modulations SAI stores as (shift, scale) are swapped. The original alphas travel in the `lorakit.kohya_alphas`
metadata, so kohya -> diffusers -> kohya gives the file back (bit-exact when alpha / rank is a power of two,
else within float rounding of the folded scale), and diffusers -> kohya -> diffusers is exact.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import torch

from lorakit.adapters.formats import tensors_by_module
from lorakit.errors import CheckpointError
from lorakit.families.common.t5_lora_names import t5_file_path, t5_module_path
from lorakit.families.sd3.sai_keys import (
    EMBEDDERS,
    Layer,
    _block_layers,
    kohya_name,
    swap_halves,
)

ALPHAS_METADATA_KEY = "lorakit.kohya_alphas"
# diffusers' component names; T5's modules are written under ComfyUI's name (common/t5_lora_names.py) and read
# under both
TE_COMPONENTS = {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3"}
T5_PREFIX = "lora_te3"
_CLIP = re.compile(r"text_model_encoder_layers_(\d+)_(self_attn|mlp)_(q_proj|k_proj|v_proj|out_proj|fc1|fc2)")
_T5 = re.compile(r"encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_(q|k|v|o|wi_0|wi_1|wo)")
_BLOCK = re.compile(r"lora_unet_joint_blocks_(\d+)_")
_TRANSFORMER_PATH = re.compile(r"transformer_blocks\.(\d+)\.")


# ---------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------


def _unet_layer(name: str) -> Layer | None:
    """The SAI layer a `lora_unet_…` name stands for (blocks listed with every optional layer)."""
    match = _BLOCK.match(name)
    if match:
        candidates = _block_layers(int(match[1]), last=False, dual=True, qk_norm=False)
    else:
        candidates = [Layer(s, d, kind, swapped) for s, d, kind, swapped in EMBEDDERS]
    return next((layer for layer in candidates if kohya_name(layer.sai) == name), None)


def _text_encoder_path(prefix: str, rest: str) -> str | None:
    if (m := _CLIP.fullmatch(rest)):
        return f"text_model.encoder.layers.{m[1]}.{m[2]}.{m[3]}"
    if (m := _T5.fullmatch(rest)):
        return f"encoder.block.{m[1]}.layer.{m[2]}.{m[3]}.{m[4]}"
    return None


# ---------------------------------------------------------------------------------------------------------
# kohya -> diffusers
# ---------------------------------------------------------------------------------------------------------


def kohya_to_diffusers(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, hidden_size: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A kohya SD3 LoRA as PEFT keys with alpha folded in, and its metadata with the alphas recorded."""
    modules = tensors_by_module(state)
    hidden = hidden_size or hidden_from_kohya(modules)
    out: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for name, tensors in modules.items():
        if "lora_down.weight" not in tensors or "lora_up.weight" not in tensors:
            raise CheckpointError(f"{name}: only lora_down/lora_up LoRA modules convert to the diffusers layout")
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(down.shape[0])
        alphas[name] = alpha
        up = up * (alpha / down.shape[0])
        for path, a, b in _kohya_module_to_pairs(name, down, up, hidden):
            out[f"{path}.lora_A.weight"] = a.contiguous().clone()  # q, k and v may share one down matrix
            out[f"{path}.lora_B.weight"] = b.contiguous()
    meta = dict(metadata or {})
    meta[ALPHAS_METADATA_KEY] = json.dumps(alphas)
    return out, meta


def _kohya_module_to_pairs(name: str, down: torch.Tensor, up: torch.Tensor, hidden: int | None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    prefix = name.split("_", 2)[0] + "_" + name.split("_", 2)[1]
    if prefix in TE_COMPONENTS:
        path = _text_encoder_path(prefix, name[len(prefix) + 1:])
        if path is None:
            raise CheckpointError(f"{name}: not a CLIP or T5 layer name of an SD3 text encoder")
        if prefix == T5_PREFIX:
            return [(t5_file_path(path), down, up)]
        return [(f"{TE_COMPONENTS[prefix]}.{path}", down, up)]
    layer = _unet_layer(name)
    if layer is None:
        raise CheckpointError(f"{name}: not a layer of the SD3 MMDiT (expected lora_unet_joint_blocks_N_… or an embedder)")
    if _is_swapped(layer, up.shape[0], hidden):
        up = swap_halves(up)
    parts = layer.diffusers
    if len(parts) == 1:
        return [(f"transformer.{parts[0]}", down, up)]
    rows = up.shape[0] // len(parts)
    pairs = []
    for j, path in enumerate(parts):
        b = up[j * rows:(j + 1) * rows]
        cols = _own_columns(b, down.shape[0], len(parts), j)
        pairs.append((f"transformer.{path}", down[cols], b[:, cols]) if cols is not None else (f"transformer.{path}", down, b))
    return pairs


def _own_columns(b: torch.Tensor, rank: int, parts: int, j: int) -> slice | None:
    """The rank columns of part j when this part's rows read only them (a block-diagonal up), else None."""
    if rank % parts:
        return None
    width = rank // parts
    own = slice(j * width, (j + 1) * width)
    others = torch.cat([b[:, : own.start], b[:, own.stop:]], dim=1)
    return own if others.numel() and not others.any() and b[:, own].any() else None


def _is_swapped(layer: Layer, rows: int, hidden: int | None) -> bool:
    if layer.sai == "final_layer.adaLN_modulation.1":
        return True
    if not layer.sai.endswith("context_block.adaLN_modulation.1"):
        return False
    if hidden is None:
        raise CheckpointError(
            f"{kohya_name(layer.sai)}: cannot tell whether this is the last block's text modulation (stored in the "
            "other half order) without the model width; convert with the model's hidden size"
        )
    return rows == 2 * hidden  # the last block's text stream only has shift and scale (2 chunks, not 6)


def hidden_from_kohya(modules: dict[str, dict[str, torch.Tensor]]) -> int | None:
    for name, tensors in modules.items():
        up = tensors.get("lora_up.weight")
        if up is None:
            continue
        if name.endswith("_attn_qkv"):
            return up.shape[0] // 3
        if name.endswith(("_attn_proj", "_mlp_fc2", "context_embedder", "t_embedder_mlp_0", "y_embedder_mlp_2")):
            return up.shape[0]
    return None


# ---------------------------------------------------------------------------------------------------------
# diffusers -> kohya
# ---------------------------------------------------------------------------------------------------------


def diffusers_to_kohya(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, hidden_size: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A PEFT-layout SD3 LoRA as kohya keys; alphas come from `lorakit.kohya_alphas` when present, else rank."""
    meta = dict(metadata or {})
    alphas = json.loads(meta.pop(ALPHAS_METADATA_KEY, "{}"))
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, value in state.items():
        path, _, suffix = key.removeprefix("base_model.model.").rpartition(".lora_")
        if suffix not in ("A.weight", "B.weight"):
            raise CheckpointError(f"{key}: not a PEFT LoRA key (expected <module>.lora_A.weight / .lora_B.weight)")
        a, b = pairs.get(path, (None, None))
        pairs[path] = (value, b) if suffix.startswith("A") else (a, value)
    hidden = hidden_size or _hidden_from_diffusers(pairs)
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    layers: dict[str, Layer] = {}
    out: dict[str, torch.Tensor] = {}
    for path, (a, b) in pairs.items():
        if a is None or b is None:
            raise CheckpointError(f"{path}: has only one of lora_A / lora_B")
        component, _, inner = path.partition(".")
        if (t5_path := t5_module_path(path)) is not None:
            component, inner = TE_COMPONENTS[T5_PREFIX], t5_path
        if component != "transformer":
            name = _text_encoder_kohya_name(component, inner)
            out.update(_kohya_tensors(name, a, b, alphas.get(name)))
            continue
        layer, index = _layer_of_diffusers_path(inner)
        layers[layer.sai] = layer
        fused.setdefault(layer.sai, {})[index] = (a, b)
    for sai, parts in fused.items():
        layer = layers[sai]
        name = kohya_name(sai)
        down, up = _fuse(layer, parts)
        if _is_swapped(layer, up.shape[0], hidden):
            up = swap_halves(up)
        out.update(_kohya_tensors(name, down, up, alphas.get(name)))
    return out, meta


def _kohya_tensors(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> dict[str, torch.Tensor]:
    rank = down.shape[0]
    if alpha is None:
        alpha = float(rank)  # the folded file's scale is 1
    else:
        up = up / (alpha / rank)
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up.contiguous(), f"{name}.alpha": torch.tensor(float(alpha))}


def _text_encoder_kohya_name(component: str, inner: str) -> str:
    prefix = {v: k for k, v in TE_COMPONENTS.items()}.get(component)
    if prefix is None:
        raise CheckpointError(f"{component}.{inner}: unknown component {component!r} (expected transformer, "
                              "text_encoder[_2|_3] or text_encoders.t5xxl.transformer)")
    return f"{prefix}_{inner.replace('.', '_')}"


def _layer_of_diffusers_path(inner: str) -> tuple[Layer, int]:
    match = _TRANSFORMER_PATH.match(inner)
    candidates = (
        _block_layers(int(match[1]), last=False, dual=True, qk_norm=False) if match
        else [Layer(s, d, kind, swapped) for s, d, kind, swapped in EMBEDDERS]
    )
    for layer in candidates:
        if inner in layer.diffusers:
            return layer, layer.diffusers.index(inner)
    raise CheckpointError(f"transformer.{inner}: not a layer the SD3 kohya layout can name")


def _fuse(layer: Layer, parts: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One (down, up) pair for an SAI layer from its diffusers parts (missing parts contribute zero rows)."""
    count = len(layer.diffusers)
    if count == 1:
        return parts[0]
    rows = next(iter(parts.values()))[1].shape[0]
    downs = [parts[j][0] for j in sorted(parts)]
    if len(parts) == count and all(torch.equal(downs[0], d) for d in downs[1:]):
        return downs[0], torch.cat([parts[j][1] for j in range(count)], dim=0)
    down = torch.cat(downs, dim=0)
    up = torch.zeros(rows * count, down.shape[0], dtype=downs[0].dtype)
    col = 0
    for j in sorted(parts):
        b = parts[j][1]
        up[j * rows:(j + 1) * rows, col:col + b.shape[1]] = b
        col += b.shape[1]
    return down, up


def _hidden_from_diffusers(pairs: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]) -> int | None:
    for path, (_, b) in pairs.items():
        if b is not None and path.endswith((".attn.to_q", ".attn.to_out.0", ".ff.net.2", "transformer.context_embedder")):
            return b.shape[0]
    return None


# ---------------------------------------------------------------------------------------------------------
# Explicit alphas (`lorakit lora convert --keep_alpha`)
# ---------------------------------------------------------------------------------------------------------


def to_peft(state: dict[str, torch.Tensor], metadata: dict[str, str], *, keep_alpha: bool = False) -> tuple[dict, dict]:
    """SD3 kohya -> PEFT. With `keep_alpha` the factors are converted at scale 1 (bit for bit) and every part
    gets an `.alpha` giving it its module's scale (alpha · part rank / module rank)."""
    if not keep_alpha:
        return kohya_to_diffusers(state, metadata)
    alphas = {k.removesuffix(".alpha"): float(v) for k, v in state.items() if k.endswith(".alpha")}
    unscaled = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    out, meta = kohya_to_diffusers(unscaled, metadata)  # no alpha: rank, i.e. scale exactly 1
    for name, paths, module_rank in _module_parts(unscaled):
        alpha = alphas.get(name, float(module_rank))
        for path in paths:
            part_rank = out[f"{path}.lora_A.weight"].shape[0]
            out[f"{path}.alpha"] = torch.tensor(alpha * part_rank / module_rank, dtype=torch.float32)
    return out, meta


def from_peft(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[dict, dict]:
    """SD3 PEFT -> kohya. `.alpha` keys (explicit scales, lora_B not folded) become the kohya alphas; without
    them the converter's rules apply (its recorded alphas, else alpha = rank)."""
    alphas = {k.removesuffix(".alpha"): float(v) for k, v in state.items() if k.endswith(".alpha")}
    factors = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    if not alphas:
        return diffusers_to_kohya(factors, metadata)
    meta = {k: v for k, v in metadata.items() if k != ALPHAS_METADATA_KEY}
    kohya, meta = diffusers_to_kohya(factors, meta)  # alpha = rank: the factors come back unscaled
    for name, paths, module_rank in _module_parts(kohya):
        values = {alphas[p] * module_rank / factors[f"{p}.lora_A.weight"].shape[0] for p in paths if p in alphas}
        if len(values) > 1:
            raise CheckpointError(f"key {paths[0]}.alpha: the parts of {name} give it different scales ({sorted(values)})")
        if values:
            kohya[f"{name}.alpha"] = torch.tensor(values.pop(), dtype=torch.float32)
    return kohya, meta


def _module_parts(kohya: dict[str, torch.Tensor]) -> list[tuple[str, list[str], int]]:
    """(kohya module, the PEFT paths it splits into, its rank) for every module of a kohya SD3 state."""
    modules = tensors_by_module(kohya)
    hidden = hidden_from_kohya(modules)  # the converter needs it to place the last modulation's halves
    rows = []
    for name, tensors in modules.items():
        single = {f"{name}.{k}": v for k, v in tensors.items() if k != "alpha"}
        parts, _ = kohya_to_diffusers(single, hidden_size=hidden)
        paths = [k.removesuffix(".lora_A.weight") for k in parts if k.endswith(".lora_A.weight")]
        rows.append((name, paths, tensors["lora_down.weight"].shape[0]))
    return rows
