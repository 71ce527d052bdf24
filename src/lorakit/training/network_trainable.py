"""The adapter network (LoRA and every other adapter algorithm) as a `Trainable`.

Its optimizer groups are sd-scripts' (`prepare_optimizer_params`: U-Net and text-encoder LRs, one group per text
encoder where the family maps `--text_encoder_lr` to several, LoRA+ groups, block-wise LR groups), max-norm runs
after each optimizer step, and its file is the kohya LoRA file (or the family's other layout with
`--save_format`) with the `ss_network_*` keys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.adapters.blocks import blockwise_param_groups, loraplus_ratios
from lorakit.adapters.factory import build_network
from lorakit.adapters.formats import load_lora_file, save_lora_file
from lorakit.adapters.network import LoRANetwork
from lorakit.adapters.spec import TargetSpec
from lorakit.data.conditioning import ConditioningUse
from lorakit.families.base import Components, ModelFamily
from lorakit.families.registry import describe_lora_names
from lorakit.training.kinds import foreign_option_problems

from lorakit.training.trainable import FrozenModelTraining, TrainableDefaults

log = logging.getLogger("lorakit")


class NetworkTrainable(TrainableDefaults):
    """An adapter network attached to a loaded model, as the loop trains it."""

    modelspec_kind = "lora"

    def __init__(self, network: LoRANetwork, spec: TargetSpec, family: ModelFamily, trains_text_encoders: bool,
                 save_format: str = "kohya"):
        self.network, self.spec, self.family = network, spec, family
        self.module: nn.Module = network
        self.trains_text_encoders = trains_text_encoders
        self.save_format = save_format  # the LoRA key layout of the files (--save_format)
        self._max_norm_warned = False

    @classmethod
    def attach(cls, spec: TargetSpec, family: ModelFamily, comps: Components, device: torch.device,
               save_format: str = "kohya") -> "NetworkTrainable":
        """Build the network the spec describes on the model's layers (with --network_weights loaded)."""
        network = build_network(spec, family, comps, device)
        if spec.weights:
            state, _ = load_lora_file(spec.weights)
            for problem in network.load_kohya_state_dict(state, source=spec.weights, describe=describe_lora_names):
                log.warning(problem)
        trainable = cls(network, spec, family, bool(family.text_encoders_to_train(comps, spec)), save_format)
        if spec.verbose:
            for name, module in network.lora_modules.items():
                log.info("%s: dim %s, alpha %s", name, getattr(module, "rank", "?"), float(getattr(module, "alpha", 0.0)))
        return trainable

    @contextmanager
    def switched_off(self) -> Iterator[None]:
        """The base model alone: every adapter at multiplier 0 (OFT rotates by the identity, LoRA adds nothing)."""
        previous = self.network.multiplier
        self.network.set_multiplier(0.0)
        try:
            yield
        finally:
            self.network.set_multiplier(previous)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.network.trainable_parameters()

    def parameter_groups(self, cfg: Any) -> tuple[list[dict[str, Any]], list[str]]:
        """Block-wise LR groups when *_lr_weight is given, else the network's own (with LoRA+).

        A family with several text encoders maps `--text_encoder_lr`'s values to them (`text_encoder_lr_groups`,
        kohya name prefix -> LR); the network then gives each encoder its own group.
        """
        ratios = loraplus_ratios(self.spec.args)
        te_lr = cfg.text_encoder_lr[0] if cfg.text_encoder_lr else None
        blockwise = blockwise_param_groups(self.network, self.spec.args, te_lr, cfg.unet_lr, cfg.learning_rate, ratios,
                                           self.family.block_layout)
        if blockwise is not None:
            return blockwise
        given: dict[str, Any] = {k: v for k, v in ratios.items() if v is not None}
        per_encoder = self.family.text_encoder_lr_groups(cfg)
        if per_encoder is not None:
            given["text_encoder_lrs"] = per_encoder
        return self.network.prepare_optimizer_params(te_lr, cfg.unet_lr, cfg.learning_rate, **given)

    def after_optimizer_step(self, cfg: Any) -> dict[str, float]:
        """--scale_weight_norms after the optimizer step (inventory §4.5), with its log values."""
        limit = cfg.scale_weight_norms
        if not limit:
            return {}
        apply = getattr(self.network, "apply_max_norm", None)
        if apply is None:
            if not self._max_norm_warned:
                log.warning("--scale_weight_norms: this network type has no max-norm; training continues without it")
                self._max_norm_warned = True
            return {}
        keys_scaled, mean_norm, max_norm = apply(limit)
        return {"max_norm/keys_scaled": keys_scaled, "max_norm/max_key_norm": max_norm, "norm/avg_key_norm": mean_norm}

    def metadata(self, cfg: Any) -> dict[str, str]:
        """sd-scripts' `ss_network_*` keys; the module is the one the family trained (its own LoRA module for
        `networks.lora` or none: what the file is, and what readers look for)."""
        meta = {
            "ss_network_module": self.spec.module,
            "ss_network_dim": str(self.spec.rank),
            "ss_network_alpha": str(cfg.network_alpha),
            "ss_network_dropout": str(cfg.network_dropout),
        }
        if cfg.network_args:
            meta["ss_network_args"] = json.dumps(dict(self.spec.args))
        return meta

    def save(self, path: Path, metadata: dict[str, str], save_dtype: torch.dtype | None, model_format: str) -> None:
        """The kohya file (or the family's other layout, e.g. SD3's diffusers one with --save_format)."""
        state, meta = self.family.lora_file_state(self.network.state_dict_kohya(), metadata, self.save_format)
        save_lora_file(state, path, meta, save_dtype=save_dtype, model_format=model_format)


class NetworkTraining(FrozenModelTraining):
    """`lorakit train`: an adapter network (LoRA and the other algorithms) on any family."""

    title = "LoRA"
    preserves_outputs = True  # the network at multiplier 0 is the base model
    conditioning = ConditioningUse.MASK  # as sd-scripts' train_network: conditioning subsets are loss masks

    def option_problems(self, cfg: Any, family: ModelFamily) -> list[str]:
        return foreign_option_problems(cfg, "train")

    def prepare_dataset(self, cfg: Any, dataset: Any) -> None:
        """Nothing: LoRA training takes the captions as they are."""

    def build(self, cfg: Any, spec: TargetSpec, family: ModelFamily, comps: Components, device: torch.device
              ) -> NetworkTrainable:
        trainable = NetworkTrainable.attach(spec, family, comps, device, cfg.save_format)
        for encoder in family.text_encoders_to_train(comps, spec):
            encoder.train()  # LoRA dropout acts only in train mode; the frozen weights have no dropout of their own
        return trainable


NETWORK = NetworkTraining()
