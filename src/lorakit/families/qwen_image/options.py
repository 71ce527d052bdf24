"""Qwen-Image's own options (musubi-tuner's `qwen_image_train_network.py`), added to `lorakit train`'s options."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from lorakit.families.common.llm_options import LanguageModelEncoderOptions


class QwenImageOptions(LanguageModelEncoderOptions):
    SECTION: ClassVar[str] = "qwen_image"
    NOT_AVAILABLE: ClassVar[dict[str, str]] = {}

    model_version: Literal["original", "edit"] | None = Field(
        None, description="[Qwen-Image] original or edit (default: what a diffusers folder says, else original)")


OPTIONS = QwenImageOptions
