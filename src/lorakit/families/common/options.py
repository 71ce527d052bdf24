"""Options of the families whose text encoders come in files of their own (T5-XXL, CLIP-L): sd-scripts' names."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from lorakit.config.schema_data import OptionSection


class EncoderFileOptions(OptionSection):
    SECTION: ClassVar[str] = "text_encoder_files"

    clip_l: str | None = Field(None, description="CLIP-L file")
    t5xxl: str | None = Field(None, description="T5-XXL file")
    t5xxl_max_token_length: int | None = Field(None, ge=1, description="T5 sequence length")
    apply_t5_attn_mask: bool = Field(False, description="mask T5 padding")
