"""Reading the already-quantized model files the community distributes, read-only, as plain state dicts.

* **float8 safetensors** (`flux1-dev-fp8.safetensors` and the like): float8_e4m3fn/e5m2 tensors are read as they
  are; the loaders cast them to the load dtype, exactly (every float8 value is a bf16/fp16/fp32 value).
* **scaled float8** (ComfyUI's `*_scaled` files: a `scaled_fp8` marker tensor, each float8 `X.weight` with a
  `X.scale_weight` scale, sometimes a `X.scale_input` for float8 matmuls): W = weight · scale_weight. The scales
  are folded in and the marker and input scales dropped, so the result is the model the file stands for.
* **GGUF** (`.gguf`, city96's FLUX/SD3 files, the original layout's key names): every tensor dequantized to
  float32 through the `gguf` package's own codecs (Q8_0, Q4_K, ... whatever `gguf.quants` reads). GGUF lists a
  tensor's dimensions innermost first; they are reversed into PyTorch's order.

Nothing is written in these formats: training re-quantizes with `--base_quant` where memory matters.
"""

from __future__ import annotations

from pathlib import Path

import torch

GGUF_SUFFIXES = (".gguf",)
SCALED_FP8_MARKER = "scaled_fp8"


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() in GGUF_SUFFIXES


def fold_fp8_scales(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A scaled-float8 state dict with its scales folded into the weights (float32); others unchanged."""
    if SCALED_FP8_MARKER not in state_dict:
        return state_dict
    folded: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == SCALED_FP8_MARKER or key.endswith((".scale_input", ".scale_weight")):
            continue
        scale = state_dict.get(key[: -len("weight")] + "scale_weight") if key.endswith(".weight") else None
        if scale is None:
            folded[key] = value
        else:
            scale = scale.float()
            folded[key] = value.float() * (scale.reshape(-1, *([1] * (value.ndim - 1))) if scale.numel() > 1 else scale)
    return folded


def read_gguf(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a GGUF file, dequantized to float32 (float tensors kept in their dtype), and the file's
    string key-value fields (its metadata)."""
    try:
        import gguf
    except ImportError:
        raise ImportError(f"{path}: reading GGUF files needs the gguf package: pip install 'lorakit[quant]' (or gguf)") from None
    reader = gguf.GGUFReader(str(path))
    plain = {gguf.GGMLQuantizationType.F32: torch.float32, gguf.GGMLQuantizationType.F16: torch.float16}
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        if tensor.tensor_type in plain:
            value = torch.from_numpy(tensor.data.copy()).to(plain[tensor.tensor_type])
        else:
            value = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        state[tensor.name] = value.reshape(shape)
    metadata = {name: bytes(field.parts[field.data[0]]).decode("utf-8") for name, field in reader.fields.items()
                if field.types == [gguf.GGUFValueType.STRING]}
    return state, metadata


def gguf_tensor_names(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and (PyTorch-order) shapes of a GGUF file, nothing dequantized (for detection)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {tensor.name: tuple(int(n) for n in reversed(tensor.shape)) for tensor in reader.tensors}
