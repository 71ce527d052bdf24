"""Chroma's LoRA names: BFL paths under `lora_unet` (`double_blocks_0_img_attn_qkv`) and T5 under `lora_te3`, as
sd-scripts' `networks.lora_flux` writes them for `--model_type chroma` (CLIP-L's `lora_te1` stays unused there)."""

from __future__ import annotations

from lorakit.adapters.key_layout import KeyLayout
from lorakit.families.common.lora_segments import T5_SEGMENTS

BFL_SEGMENTS = (
    "double_blocks", "single_blocks", "img_attn", "txt_attn", "qkv", "proj", "img_mlp", "txt_mlp", "linear1", "linear2",
    "img_in", "txt_in", "final_layer", "linear",
)

LORA_LAYOUT = KeyLayout(
    family="chroma",
    components={"lora_unet": "transformer", "lora_te3": "text_encoder"},
    segments=frozenset(BFL_SEGMENTS + T5_SEGMENTS),
)
