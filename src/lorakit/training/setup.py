"""Loading a run's model and attaching what it trains (a `Trainable`): the `Session` the training step works on.

What a command trains is a `TrainingType` (`training/trainable.py`): the adapter network (`lorakit train`),
new token vectors (`textual-inversion`), a ControlNet (`controlnet`) or the model's own weights (`finetune`,
`dreambooth`). The type says what the family loads for it, which modules keep the dtype they were loaded in
(trained weights stay float32 under mixed precision) and builds the `Trainable`; the rest of the set-up is the same.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from accelerate import Accelerator

from lorakit.adapters.spec import TargetSpec
from lorakit.data.text_cache import CaptionCache
from lorakit.families.base import ModelFamily
from lorakit.families.common.transformer_family import SWAP_TRAINED
from lorakit.precision import WEIGHT_DTYPES
from lorakit.training import distributed
from lorakit.training.compiled import compile_blocks
from lorakit.training.network_files import merge_base_weights
from lorakit.training.network_trainable import NETWORK
from lorakit.training.session import Session
from lorakit.training.trainable import TrainingType

log = logging.getLogger("lorakit")


def setup_session(cfg: Any, family: ModelFamily, accelerator: Accelerator, spec: TargetSpec | None = None,
                  kind: TrainingType = NETWORK, text_cache: CaptionCache | None = None) -> Session:
    """Load the model, place it, write the text-encoder cache files still missing, and attach what the training
    type trains (for LoRA training: the adapter network the spec describes, built from `cfg` when None) as the
    run's `Trainable`."""
    spec = spec or kind.spec(cfg, family)
    comps = family.load(cfg, spec, text_cache)
    merge_base_weights(cfg, family, comps)
    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
    device = accelerator.device
    swap_blocks = family.swaps_blocks(cfg)
    trained = kind.trained_modules(cfg, family, comps, spec)
    quantize_frozen(cfg, family, comps, trained)
    for module in [comps.denoiser, comps.vae, *comps.text_encoders]:
        module.requires_grad_(False)
        module.eval()
        # with --blocks_to_swap the denoiser never goes to the device whole: the family places it, keeping the
        # swapped blocks' weights on the CPU, so loading needs no more device memory than training
        dtype = torch.float32 if module is comps.vae and cfg.no_half_vae else weight_dtype
        if any(module is t for t in trained):
            dtype = next(module.parameters()).dtype  # trained weights keep the precision they were loaded in
        _move(module, torch.device("cpu") if swap_blocks and module is comps.denoiser else device, dtype)
    if swap_blocks:
        comps.extras[SWAP_TRAINED] = any(comps.denoiser is t for t in trained)
        family.prepare_block_swap(comps, cfg, device)
    if text_cache is not None:
        # before the network attaches: the files hold the base encoders' outputs, as sd-scripts caches them
        text_cache.device = device
        with accelerator.autocast():  # as the step would encode (fp8 weights compute in the autocast dtype)
            distributed.cache_text_outputs(text_cache, accelerator, lambda captions: family.text_encoder_outputs(
                comps, captions, cfg.clip_skip), cfg.text_encoder_batch_size or cfg.train_batch_size)
    trainable = kind.build(cfg, spec, family, comps, device)
    if cfg.gradient_checkpointing:
        family.enable_gradient_checkpointing(comps, trainable.trains_text_encoders)
    _full_precision(cfg, trainable.module, accelerator)
    # after the adapters attach: traced with them. --compile compiles block by block (one graph per block's code,
    # outside block swap's hooks); --torch_compile alone compiles the whole denoiser, as sd-scripts does
    comps.extras["compiled"] = compile_blocks(cfg, family, comps)
    if cfg.torch_compile and comps.extras["compiled"] is None:
        compile_denoiser(cfg, comps.denoiser)
    comps.denoiser.train()
    return Session(cfg, family, comps, trainable, family.objective(cfg, comps), accelerator, weight_dtype)


def quantize_frozen(cfg: Any, family: ModelFamily, comps: Any, trained: list[torch.nn.Module] = ()) -> int:
    """--base_quant: the denoiser's and the large text encoders' linears and convolutions stored quantized, before
    they are placed (so they travel to the device small); `trained` modules (a fine-tune's) keep their weights.
    `fp8` is `--fp8_base`, which the families apply as they load (a family that stores no float8 itself gets it
    here). Returns how many layers were quantized here."""
    from lorakit.families.common.quant import holds_fp8, quantize

    mode = getattr(cfg, "base_quant", None)
    if mode is None or mode == "fp8" and (holds_fp8(comps.denoiser) or cfg.fp8_base_unet):
        return 0
    encoders = [comps.text_encoders[i] for i in family.large_text_encoders if i < len(comps.text_encoders)]
    frozen = [part for part in [comps.denoiser, *encoders] if part is not None and not any(part is t for t in trained)]
    layers = sum(quantize(part, mode) for part in frozen)
    log.info("--base_quant %s: %d layers store quantized weights", mode, layers)
    return layers


def compile_denoiser(cfg: Any, denoiser: torch.nn.Module) -> None:
    """--torch_compile: the denoiser (with its adapters attached) compiled in place by torch.compile with
    --dynamo_backend/--dynamo_mode/--dynamo_fullgraph/--dynamo_dynamic, as sd-scripts has accelerate compile the
    U-Net/DiT; the module keeps its identity and parameter names, so files and states are unchanged."""
    backend = (cfg.dynamo_backend or "inductor").lower()
    log.info("--torch_compile: the denoiser compiles on its first steps (backend %s)", backend)
    denoiser.compile(backend=backend, mode=cfg.dynamo_mode, fullgraph=cfg.dynamo_fullgraph,
                     dynamic=True if cfg.dynamo_dynamic else None)


def _full_precision(cfg: Any, trained: torch.nn.Module, accelerator: Accelerator) -> None:
    """--full_bf16 / --full_fp16: the trained weights themselves in half precision (less memory, less exact)."""
    if cfg.full_bf16:
        trained.to(dtype=torch.bfloat16)
    elif cfg.full_fp16:
        trained.to(dtype=torch.float16)
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None:
            # the gradient scaler refuses to unscale fp16 gradients unless told that they are meant to be fp16
            original = scaler._unscale_grads_
            scaler._unscale_grads_ = lambda optimizer, inv_scale, found_inf, allow_fp16: original(optimizer, inv_scale, found_inf, True)


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a frozen module; cast only when the dtype changes (diffusers warns on every cast)."""
    current = next(module.parameters()).dtype
    module.to(device=device) if current == dtype else module.to(device=device, dtype=dtype)
