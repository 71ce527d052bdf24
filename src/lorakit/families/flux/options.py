"""FLUX.1's own options (sd-scripts' `flux_train_network.py`), added to `lorakit train`'s options."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from lorakit.families.common.options import EncoderFileOptions


class FluxOptions(EncoderFileOptions):
    SECTION: ClassVar[str] = "flux"
    NOT_AVAILABLE: ClassVar[dict[str, str]] = {}

    ae: str | None = Field(None, description="[FLUX] autoencoder file")
    model_type: Literal["flux", "chroma"] = Field("flux", description="[FLUX] flux or chroma")
    guidance_scale: float = Field(3.5, description="[FLUX] guidance embedding value during training")
    split_mode: bool = Field(False, description="[FLUX] deprecated; means --blocks_to_swap 18")
    # lorakit controlnet: sd-scripts' flux_train_control_net.py builds 2 double and 0 single blocks
    controlnet_double_blocks: int = Field(2, ge=0, description="[FLUX ControlNet] double blocks of the ControlNet")
    controlnet_single_blocks: int = Field(0, ge=0, description="[FLUX ControlNet] single blocks of the ControlNet")
    double_blocks_to_swap: int | None = Field(None, ge=0, description="[FLUX] deprecated: --blocks_to_swap N + single // 2")
    single_blocks_to_swap: int | None = Field(None, ge=0, description="[FLUX] deprecated: adds N // 2 to --blocks_to_swap")


OPTIONS = FluxOptions
