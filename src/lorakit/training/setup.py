"""Loading a run's model and attaching what it trains (a `Trainable`): the `Session` the training step works on.

What a command trains is a `TrainableKind`: the adapter network (`NetworkKind`, `lorakit train`) or the model's
own weights (`training/finetune_setup.FinetuneKind`, `lorakit finetune`). The kind checks its options before
anything loads, says what the family loads for it, which modules keep the dtype they were loaded in (trained
weights stay float32 under mixed precision) and builds the `Trainable`; the rest of the set-up is the same.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import nn

from lorakit.adapters.spec import TargetSpec, target_spec_from_config
from lorakit.families.base import Components, ModelFamily
from lorakit.families.checks import FamilyChecks, check_family_options
from lorakit.families.common.transformer_family import SWAP_TRAINED
from lorakit.precision import WEIGHT_DTYPES
from lorakit.training.network_trainable import NetworkTrainable
from lorakit.training.session import Session
from lorakit.training.trainable import Trainable

log = logging.getLogger("lorakit")


class TrainableKind(Protocol):
    def checks(self, cfg: Any, family: ModelFamily) -> FamilyChecks:
        """The family's option rules and the kind's own, with the spec the family loads for."""

    def spec(self, cfg: Any, family: ModelFamily) -> TargetSpec:
        """What the family loads for (which encoders train, what can be cached)."""

    def trained_modules(self, cfg: Any, family: ModelFamily, comps: Components, spec: TargetSpec) -> list[nn.Module]:
        """Model parts whose own weights train: placed on the device without a cast to the weight dtype."""

    def attach(self, cfg: Any, family: ModelFamily, comps: Components, spec: TargetSpec, device: Any) -> Trainable:
        """The run's Trainable on the placed model."""


class NetworkKind:
    """An adapter network (LoRA and the other algorithms) on the frozen model."""

    def checks(self, cfg: Any, family: ModelFamily) -> FamilyChecks:
        return check_family_options(cfg, family)

    def spec(self, cfg: Any, family: ModelFamily) -> TargetSpec:
        return target_spec_from_config(cfg, family)

    def trained_modules(self, cfg: Any, family: ModelFamily, comps: Components, spec: TargetSpec) -> list[nn.Module]:
        return []

    def attach(self, cfg: Any, family: ModelFamily, comps: Components, spec: TargetSpec, device: Any) -> Trainable:
        return NetworkTrainable.attach(spec, family, comps, device, cfg.save_format)


def setup_session(cfg: Any, family: ModelFamily, accelerator: Accelerator, spec: TargetSpec | None = None,
                  kind: TrainableKind | None = None) -> Session:
    """Load the model, place it, and attach what `kind` trains (the adapter network when None) as the run's
    `Trainable`."""
    kind = kind or NetworkKind()
    spec = spec or kind.spec(cfg, family)
    comps = family.load(cfg, spec)
    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
    device = accelerator.device
    swap_blocks = family.swaps_blocks(cfg)
    trained = kind.trained_modules(cfg, family, comps, spec)
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
    trained_encoders = [m for m in trained if m is not comps.denoiser] or family.text_encoders_to_train(comps, spec)
    if cfg.gradient_checkpointing:
        family.enable_gradient_checkpointing(comps, bool(trained_encoders))
    trainable = kind.attach(cfg, family, comps, spec, device)
    _full_precision(cfg, trainable.module, accelerator)
    for encoder in trained_encoders:
        encoder.train()  # LoRA dropout acts only in train mode; the frozen weights have no dropout of their own
    comps.denoiser.train()
    return Session(cfg, family, comps, trainable, family.objective(cfg, comps), accelerator, weight_dtype)


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
