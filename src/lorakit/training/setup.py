"""Loading a run's model and building what it trains: the `Session` the training step works on."""

from __future__ import annotations

import logging
from typing import Any

import torch
from accelerate import Accelerator

from lorakit.adapters.factory import build_network
from lorakit.errors import ConfigError
from lorakit.families.base import ModelFamily
from lorakit.precision import WEIGHT_DTYPES
from lorakit.training.session import Session

log = logging.getLogger("lorakit")


def setup_session(cfg: Any, family: ModelFamily, accelerator: Accelerator) -> Session:
    if getattr(cfg, "save_format", "kohya") != "kohya" and not hasattr(family, "lora_file_state"):
        raise ConfigError([f"--save_format {cfg.save_format}: the {family.name} family writes the kohya layout only "
                           "(convert afterwards with `lorakit lora convert --to diffusers`)"])
    comps = family.load(cfg)
    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
    device = accelerator.device
    swap_blocks = bool(getattr(cfg, "blocks_to_swap", None)) and hasattr(family, "prepare_block_swap")
    for module in [comps.denoiser, comps.vae, *comps.text_encoders]:
        module.requires_grad_(False)
        module.eval()
        # with --blocks_to_swap the denoiser never goes to the device whole: the family places it, keeping the
        # swapped blocks' weights on the CPU, so loading needs no more device memory than training
        dtype = torch.float32 if module is comps.vae and cfg.no_half_vae else weight_dtype
        _move(module, torch.device("cpu") if swap_blocks and module is comps.denoiser else device, dtype)
    if swap_blocks:
        family.prepare_block_swap(comps, cfg, device)
    train_text_encoder = bool(family.text_encoders_to_train(comps, cfg))
    if cfg.gradient_checkpointing:
        family.enable_gradient_checkpointing(comps, train_text_encoder)
    network = build_network(cfg, family, comps, device)
    _full_precision_network(cfg, network, accelerator)
    _list_modules(cfg, network)
    if train_text_encoder:
        for encoder in family.text_encoders_to_train(comps, cfg):
            encoder.train()  # LoRA dropout acts only in train mode; the frozen weights have no dropout of their own
    comps.denoiser.train()
    return Session(cfg, family, comps, network, family.objective(cfg, comps), accelerator, weight_dtype, train_text_encoder)


def _full_precision_network(cfg: Any, network: torch.nn.Module, accelerator: Accelerator) -> None:
    """--full_bf16 / --full_fp16: the adapter weights themselves in half precision (less memory, less exact)."""
    if cfg.full_bf16:
        network.to(dtype=torch.bfloat16)
    elif cfg.full_fp16:
        network.to(dtype=torch.float16)
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None:
            # the gradient scaler refuses to unscale fp16 gradients unless told that they are meant to be fp16
            original = scaler._unscale_grads_
            scaler._unscale_grads_ = lambda optimizer, inv_scale, found_inf, allow_fp16: original(optimizer, inv_scale, found_inf, True)


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a frozen module; cast only when the dtype changes (diffusers warns on every cast)."""
    current = next(module.parameters()).dtype
    module.to(device=device) if current == dtype else module.to(device=device, dtype=dtype)


def _list_modules(cfg: Any, network: Any) -> None:
    """`--network_args verbose=True`: every module with its rank and alpha (only the literal True counts)."""
    kwargs = cfg.network_kwargs() if cfg.network_args else {}
    if kwargs.get("verbose") != "True":
        return
    for name, module in getattr(network, "lora_modules", {}).items():
        log.info("%s: dim %s, alpha %s", name, getattr(module, "rank", "?"), float(getattr(module, "alpha", 0.0)))
