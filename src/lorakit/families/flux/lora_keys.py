"""FLUX.1 LoRA names: BFL paths under `lora_unet` (`double_blocks_0_img_attn_qkv`), CLIP-L under `lora_te1` and
T5 under `lora_te3` (sd-scripts' `networks.lora_flux`)."""

from __future__ import annotations

from lorakit.adapters.key_layout import KeyLayout
from lorakit.families.common.lora_segments import CLIP_SEGMENTS, T5_SEGMENTS

BFL_SEGMENTS = (
    "double_blocks", "single_blocks", "img_attn", "txt_attn", "qkv", "proj", "img_mlp", "txt_mlp", "img_mod",
    "txt_mod", "lin", "linear1", "linear2", "modulation", "img_in", "txt_in", "time_in", "vector_in",
    "guidance_in", "in_layer", "out_layer", "final_layer", "linear",
)

LORA_LAYOUT = KeyLayout(
    family="flux",
    components={"lora_unet": "transformer", "lora_te1": "text_encoder", "lora_te3": "text_encoder_2"},
    segments=frozenset(BFL_SEGMENTS + CLIP_SEGMENTS + T5_SEGMENTS),
)
