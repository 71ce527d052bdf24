"""Chroma's options: those of sd-scripts' `flux_train_network.py --model_type chroma` (the T5-XXL and AE files,
the model type), declared here as well so Chroma needs no other family's section."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from lorakit.families.common.options import EncoderFileOptions


class ChromaOptions(EncoderFileOptions):
    SECTION: ClassVar[str] = "chroma"
    NOT_AVAILABLE: ClassVar[dict[str, str]] = {}

    ae: str | None = Field(None, description="[FLUX] autoencoder file")
    model_type: Literal["flux", "chroma"] = Field("flux", description="[FLUX] flux or chroma")
    guidance_scale: float = Field(3.5, description="[FLUX] guidance embedding value during training")


OPTIONS = ChromaOptions
