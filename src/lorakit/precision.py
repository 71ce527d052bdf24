"""The dtype a run's frozen weights have, decided once from `--mixed_precision` and `--no_half_vae`.

Frozen weights (the model a LoRA trains on) live in the mixed-precision dtype during training, as in sd-scripts,
so the loaders build them in that dtype directly: tensor by tensor from the memory-mapped file, never as a float32
copy of the whole model first (FLUX.1-dev's transformer alone is 48 GB in float32, 24 GB in bf16). With
`--no_half_vae` the VAE must stay float32, so the model loads in float32 and only the other parts are cast.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("lorakit")

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def effective_mixed_precision(cfg: Any, *, warn: bool = False) -> str:
    """`--mixed_precision`, except that fp16 without a CUDA GPU means fp32 (fp16 autocast needs a GPU, and bf16
    convolutions on most CPUs are many times slower than fp32)."""
    precision = getattr(cfg, "mixed_precision", None) or "no"
    if precision == "fp16" and not torch.cuda.is_available():
        if warn:
            log.warning("--mixed_precision fp16 needs a CUDA GPU; training in fp32 on this machine instead")
        return "no"
    return precision


def load_dtype(cfg: Any) -> torch.dtype:
    """The dtype to build the base model in: the training dtype of frozen weights, or float32 with --no_half_vae.

    When the model's own weights train (a fine-tune) they are built in float32, as sd-scripts keeps them under
    mixed precision (autocast computes in half precision, the optimizer updates float32 weights), or directly in
    the half precision of --full_bf16 / --full_fp16; the frozen parts are cast to the weight dtype afterwards."""
    if getattr(cfg, "trains_model_weights", False):
        if getattr(cfg, "full_bf16", False):
            return torch.bfloat16
        return torch.float16 if getattr(cfg, "full_fp16", False) else torch.float32
    if getattr(cfg, "no_half_vae", False):
        return torch.float32
    return WEIGHT_DTYPES[effective_mixed_precision(cfg)]
