"""The model's own weights as a `Trainable`: full fine-tuning and DreamBooth (`lorakit finetune`, `lorakit
dreambooth`), for every family.

`module` holds the trained parts (the denoiser and the trained text encoders, under their part names) and, with
`--ema_decay`, their moving averages: its state dict is the model part of a training state, so a resumed run
continues bit for bit. The optimizer groups are sd-scripts': the denoiser at --learning_rate (or SDXL's 23
`--block_lr` groups, a 0 freezing its block), each text encoder at its `--learning_rate_te*` (0 leaves it
frozen). DreamBooth's `--stop_text_encoder_training N` stops the text encoder after step N (its weights then
get no more gradients). `save` writes a checkpoint in the layout the model came in (`checkpoint_files.py`) with
the ModelSpec metadata of a whole model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.families.base import Components, ModelFamily
from lorakit.training.checkpoint_files import ModelLayout, save_checkpoint
from lorakit.training.ema import WeightAverage
from lorakit.training.trainable import TrainableDefaults

log = logging.getLogger("lorakit")


class TrainedParts(nn.Module):
    """The trained parts of the model by part name (`denoiser`, `text_encoder_0`, ...), and their EMA."""

    def __init__(self, parts: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.ema: WeightAverage | None = None


class FinetuneTrainable(TrainableDefaults):
    """The denoiser's and the text encoders' weights, trained in place."""

    modelspec_kind = ""  # a whole model: its ModelSpec architecture has no adapter suffix
    steps_during_backward = True  # --fused_backward_pass and the like: the whole-model scripts' memory savers

    def __init__(self, family: ModelFamily, comps: Components, parts: dict[str, nn.Module], groups: list[dict[str, Any]],
                 group_names: list[str], source: ModelLayout, out_kind: str, cfg: Any):
        self.family, self.comps, self.source, self.out_kind = family, comps, source, out_kind
        self.module = TrainedParts(parts)
        self._groups, self._group_names = groups, group_names
        self.encoders = [module for name, module in parts.items() if name.startswith("text_encoder")]
        self.stop_text_encoder = cfg.stop_text_encoder_training
        self.trains_text_encoders = bool(self.encoders)
        self.save_ema = cfg.save_ema
        if cfg.ema_decay is not None:
            self.module.ema = WeightAverage(self.trainable_parameters(), cfg.ema_decay, cfg.ema_update_every)
        self._step = 0

    # -- what trains ------------------------------------------------------------------------------------------
    def parameter_groups(self, cfg: Any) -> tuple[list[dict[str, Any]], list[str]]:
        return [dict(group) for group in self._groups], list(self._group_names)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for group in self._groups for p in group["params"]]

    def before_step(self, global_step: int) -> None:
        self._step = global_step
        if self.encoders and self.stop_text_encoder is not None and self.stop_text_encoder >= 0:
            trains = global_step < self.stop_text_encoder
            if trains != self.trains_text_encoders:
                log.info("step %d: the text encoder stops training (--stop_text_encoder_training)", global_step)
                self.trains_text_encoders = trains
                for encoder in self.encoders:
                    encoder.train(trains)

    def after_optimizer_step(self, cfg: Any) -> dict[str, float]:
        if self.module.ema is not None:
            self.module.ema.after_step(self._step + 1)
        return {}

    # -- files ------------------------------------------------------------------------------------------------
    def metadata(self, cfg: Any) -> dict[str, str]:
        return {}

    def file_suffix(self, cfg: Any) -> str:
        return "" if self.out_kind == "folder" else f".{self.out_kind}"

    def save(self, path: Path, metadata: dict[str, str], save_dtype: torch.dtype | None, model_format: str) -> None:
        """The checkpoint (sd-scripts writes only the ModelSpec keys into one); with an EMA, `NAME-ema.*` beside
        it (--save_ema alongside) or the averages in its place (--save_ema instead)."""
        meta = {k: v for k, v in metadata.items() if k.startswith("modelspec.")}
        trained = tuple(self.module.parts.keys())
        ema = self.module.ema
        if ema is not None and self.save_ema == "instead":
            with ema.swapped_in():
                save_checkpoint(self.family, self.comps, trained, self.source, path, self.out_kind, meta, save_dtype)
            return
        save_checkpoint(self.family, self.comps, trained, self.source, path, self.out_kind, meta, save_dtype)
        if ema is not None:
            with ema.swapped_in():
                save_checkpoint(self.family, self.comps, trained, self.source, ema_path(path), self.out_kind, meta, save_dtype)


def ema_path(path: Path) -> Path:
    """`NAME-000002.safetensors` -> `NAME-000002-ema.safetensors` (a folder: `NAME-000002-ema`)."""
    suffix = path.suffix if path.suffix in (".safetensors", ".ckpt") else ""
    return path.with_name(path.name[: len(path.name) - len(suffix)] + "-ema" + suffix)
