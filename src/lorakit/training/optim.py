"""Optimizer construction from --optimizer_type / --optimizer_args."""

from __future__ import annotations

from typing import Any

import torch

from lorakit.errors import ConfigError


def optimizer_name(cfg: Any) -> str:
    return (cfg.optimizer_type or "AdamW").strip()


def build_optimizer(cfg: Any, param_groups: list[dict]) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer and its description for `ss_optimizer` (`module.Class(k=v,...)`, as sd-scripts writes it)."""
    name = optimizer_name(cfg)
    kwargs = cfg.optimizer_kwargs() if hasattr(cfg, "optimizer_kwargs") else {}
    if name.lower() != "adamw":
        raise ConfigError([f"--optimizer_type {name}: not implemented yet in lorakit (available: AdamW)"])
    try:
        optimizer = torch.optim.AdamW(param_groups, lr=cfg.learning_rate, **kwargs)
    except TypeError as exc:
        raise ConfigError([f"--optimizer_args {kwargs}: not accepted by AdamW ({exc})"]) from exc
    described = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return optimizer, f"torch.optim.adamw.AdamW({described})" if described else "torch.optim.adamw.AdamW"
