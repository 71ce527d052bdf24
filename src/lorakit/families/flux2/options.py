"""FLUX.2 [klein]'s own options, named as musubi-tuner's `flux_2_train_network.py` names them (the transformer is
`--pretrained_model_name_or_path`, the autoencoder `--vae`)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from lorakit.config.schema_data import OptionSection


class Flux2Options(OptionSection):
    SECTION: ClassVar[str] = "flux2"
    NOT_AVAILABLE: ClassVar[dict[str, str]] = {}

    text_encoder: str | None = Field(None, description="[FLUX.2] Qwen3 text encoder file (the first shard of a split one)")
    model_version: Literal["klein-4b", "klein-base-4b", "klein-9b", "klein-base-9b"] | None = Field(
        None, description="[FLUX.2] musubi-tuner's model version; checked against the model")


OPTIONS = Flux2Options
