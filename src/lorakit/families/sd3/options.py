"""SD3 / SD3.5's own options (sd-scripts' `sd3_train_network.py`), added to `lorakit train`'s options."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from lorakit.families.common.options import EncoderFileOptions


class SD3Options(EncoderFileOptions):
    SECTION: ClassVar[str] = "sd3"
    #: options sd-scripts has that do nothing there either: accepted with this warning
    NO_EFFECT: ClassVar[dict[str, str]] = {
        name: f"--{name} has no effect: sd-scripts marks it \"DOES NOT WORK\" and ignores it too"
        for name in ("save_clip", "save_t5xxl", "t5xxl_device", "t5xxl_dtype")
    }

    clip_g: str | None = Field(None, description="[SD3] CLIP-G file")
    training_shift: float = Field(1.0, gt=0, description="[SD3] shift of the sampled timesteps")
    apply_lg_attn_mask: bool = Field(False, description="[SD3] mask CLIP-L/G padding")
    # These zero an encoder's output with the given probability (no rescaling), so 1.0 is allowed.
    clip_l_dropout_rate: float = Field(0.0, ge=0, le=1, description="[SD3] CLIP-L output dropout")
    clip_g_dropout_rate: float = Field(0.0, ge=0, le=1, description="[SD3] CLIP-G output dropout")
    t5_dropout_rate: float = Field(0.0, ge=0, le=1, description="[SD3] T5 output dropout")
    pos_emb_random_crop_rate: float = Field(0.0, ge=0, le=1, description="[SD3.5M] positional crop rate")
    enable_scaled_pos_embed: bool = Field(False, description="[SD3.5M] scaled positional embeddings")
    save_clip: bool = Field(False, description="[SD3] save CLIP models (does not work in sd-scripts)")
    save_t5xxl: bool = Field(False, description="[SD3] save T5 (does not work in sd-scripts)")
    t5xxl_device: str | None = Field(None, description="[SD3] T5 device (does not work in sd-scripts)")
    t5xxl_dtype: str | None = Field(None, description="[SD3] T5 dtype (does not work in sd-scripts)")


OPTIONS = SD3Options
