"""FLUX.2 [klein]'s LoRA names: BFL paths under `lora_unet` (`double_blocks_0_img_attn_qkv`), as musubi-tuner's
`networks.lora_flux_2` writes them; the Qwen3 text encoder is not trained (as there)."""

from __future__ import annotations

from lorakit.adapters.key_layout import KeyLayout

BFL_SEGMENTS = (
    "double_blocks", "single_blocks", "img_attn", "txt_attn", "qkv", "proj", "img_mlp", "txt_mlp", "linear1", "linear2",
    "img_in", "txt_in", "time_in", "guidance_in", "in_layer", "out_layer",
)

LORA_LAYOUT = KeyLayout(family="flux2", components={"lora_unet": "transformer"}, segments=frozenset(BFL_SEGMENTS))
