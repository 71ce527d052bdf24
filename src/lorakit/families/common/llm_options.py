"""The option of the families whose text encoder is a language model given in a file of its own (a Qwen-class
LLM): musubi-tuner's `--text_encoder`."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from lorakit.config.schema_data import OptionSection


class LanguageModelEncoderOptions(OptionSection):
    SECTION: ClassVar[str] = "language_model_encoder"
    NOT_AVAILABLE: ClassVar[dict[str, str]] = {}

    text_encoder: str | None = Field(None, description="[LLM-conditioned DiT] text encoder file (Qwen2.5-VL, Qwen3)")
