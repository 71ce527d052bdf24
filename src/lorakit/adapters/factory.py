"""`--network_module` -> the adapter network, built over the layers a model family offers.

This is the one place that knows which adapter algorithms exist; the training loop only calls
`build_network`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lorakit.adapters.network import LoRANetwork
from lorakit.errors import ConfigError
from lorakit.families.base import Components

log = logging.getLogger("lorakit")

KOHYA_LORA_MODULES = ("networks.lora", "networks.lora_sd3", "networks.lora_flux")


def build_network(cfg: Any, family: Any, comps: Components, device: torch.device) -> LoRANetwork:
    """The network named by --network_module, attached to the model, with --network_weights loaded."""
    module = cfg.network_module or "networks.lora"
    if module not in KOHYA_LORA_MODULES:
        raise ConfigError([f"--network_module {module}: not available (available: {', '.join(KOHYA_LORA_MODULES)})"])
    kwargs = cfg.network_kwargs() if cfg.network_args else {}
    network = LoRANetwork(
        family.adapter_targets(comps, cfg),
        dropout=cfg.network_dropout,
        rank_dropout=_float(kwargs, "rank_dropout"),
        module_dropout=_float(kwargs, "module_dropout"),
    )
    network.apply_to()
    if cfg.network_weights:
        from lorakit.adapters.formats import load_lora_file

        state, _ = load_lora_file(cfg.network_weights)
        for problem in network.load_kohya_state_dict(state, source=cfg.network_weights):
            log.warning(problem)
    network.to(device=device, dtype=torch.float32)
    counts = network.num_modules_by_component()
    log.info("LoRA modules: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
    return network


def _float(kwargs: dict[str, str], key: str) -> float | None:
    if key not in kwargs:
        return None
    try:
        return float(kwargs[key])
    except ValueError as exc:
        raise ConfigError([f"--network_args {key}={kwargs[key]}: must be a number"]) from exc
