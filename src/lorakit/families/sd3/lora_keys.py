"""SD3 LoRA names: SAI MMDiT paths under `lora_unet` (`joint_blocks_0_x_block_attn_qkv`), CLIP-L, CLIP-G and T5
under `lora_te1`/`lora_te2`/`lora_te3` (sd-scripts' `networks.lora_sd3`)."""

from __future__ import annotations

from lorakit.adapters.key_layout import KeyLayout
from lorakit.families.common.lora_segments import CLIP_SEGMENTS, T5_SEGMENTS

MMDIT_SEGMENTS = (
    "joint_blocks", "x_block", "context_block", "attn", "attn2", "qkv", "proj", "mlp", "fc1", "fc2",
    "adaLN_modulation", "context_embedder", "t_embedder", "x_embedder", "y_embedder", "final_layer", "linear",
)

LORA_LAYOUT = KeyLayout(
    family="sd3",
    components={"lora_unet": "transformer", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3"},
    segments=frozenset(MMDIT_SEGMENTS + CLIP_SEGMENTS + T5_SEGMENTS),
)
