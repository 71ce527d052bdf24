"""What the families conditioned by a language model share (Qwen-Image with Qwen2.5-VL, Z-Image with Qwen3),
as musubi-tuner trains them: LoRA on the transformer only, the velocity as the model's output, one list of
transformer blocks to swap, fp8 for the transformer and (with --fp8_base) the language model."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

from lorakit.errors import ConfigError
from lorakit.families.base import Components, ModelSource
from lorakit.families.common.layers import to_fp8
from lorakit.families.common.packing import PATCH
from lorakit.families.common.transformer_family import clip_length_warnings, flow_family_problems, note_block_swap
from lorakit.objectives.flow import FlowObjective

log = logging.getLogger("lorakit")


class LanguageModelConditioned:
    """Mixin for a `ModelFamily` whose text encoder is a frozen language model (`encoder_title`) and whose
    transformer keeps its swappable blocks in `swap_blocks_attribute`."""

    encoder_title: ClassVar[str] = "the language model"
    swap_blocks_attribute: ClassVar[str] = "transformer_blocks"

    def option_problems(self, cfg: Any, spec: Any = None) -> list[str]:
        problems = super().option_problems(cfg, spec)  # type: ignore[misc]
        if spec is not None and spec.train_text_encoder and not spec.train_unet:
            problems.append(f"--network_train_text_encoder_only: {self.title} LoRAs train the transformer only (as "  # type: ignore[attr-defined]
                            f"musubi-tuner); {self.encoder_title} carries no adapter")
        return problems + flow_family_problems(self.name, cfg)  # type: ignore[attr-defined]

    def option_warnings(self, cfg: Any) -> list[str]:
        notes = clip_length_warnings(self.name, cfg)  # type: ignore[attr-defined]
        if not cfg.network_train_unet_only:
            notes.append(f"{self.title} LoRAs train the transformer only (as musubi-tuner): {self.encoder_title} stays frozen")  # type: ignore[attr-defined]
        return notes

    def objective(self, cfg: Any, comps: Components) -> FlowObjective:
        """sd-scripts' flow options on the velocity the model gives (musubi-tuner's loss): --model_prediction_type
        does not apply."""
        objective = FlowObjective.from_options(cfg, patch_size=PATCH)
        return dataclasses.replace(objective, options=dataclasses.replace(objective.options, model_prediction_type="raw"))

    @classmethod
    def _check_block_swap(cls, cfg: Any, comps: Components) -> None:
        """musubi-tuner's limit (at most blocks − 2 swapped), then the plan: the last N blocks live on the CPU
        (`common/block_swap.py`; installed on the device by the first `predict`)."""
        swap = cfg.blocks_to_swap or 0
        if not swap:
            return
        blocks = len(getattr(comps.denoiser, cls.swap_blocks_attribute))
        if swap > blocks - 2:
            raise ConfigError([f"--blocks_to_swap {swap}: this model has {blocks} blocks, so at most {blocks - 2} can be swapped"])
        note_block_swap(comps, [("blocks", cls.swap_blocks_attribute, swap)])


def store_fp8(comps: Components, source: ModelSource) -> None:
    """--fp8_base_unet: the transformer's linear weights in float8; --fp8_base: the language model's too."""
    if not source.fp8:
        return
    layers = to_fp8(comps.denoiser)
    if source.fp8 == "all" and comps.text_encoders and comps.text_encoders[0] is not None:
        layers += to_fp8(comps.text_encoders[0])
    log.info("--fp8_base: %d linear layers store float8_e4m3fn weights", layers)
