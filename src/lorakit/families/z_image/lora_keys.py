"""Z-Image LoRA names: ComfyUI's module paths (the Lumina 2 NextDiT names of its Z-Image model) under `lora_unet`:
`lora_unet_layers_0_attention_qkv` (q, k and v fused), `lora_unet_layers_0_attention_out`,
`lora_unet_layers_0_feed_forward_w1`. These are the names ComfyUI's generic `lora_unet_` table gives its model's
weights, and what musubi-tuner's `convert_z_image_lora_to_comfy.py` writes; `lorakit lora convert --to diffusers`
splits them into diffusers' `to_q`/`to_k`/`to_v`/`to_out.0` (which ComfyUI reads too)."""

from __future__ import annotations

from lorakit.adapters.key_layout import KeyLayout

SEGMENTS = (
    "layers", "noise_refiner", "context_refiner", "attention", "qkv", "out", "feed_forward", "w1", "w2", "w3",
    "adaLN_modulation", "x_embedder", "final_layer", "linear", "cap_embedder", "t_embedder", "mlp",
)

LORA_LAYOUT = KeyLayout(family="Z-Image", components={"lora_unet": "transformer"}, segments=frozenset(SEGMENTS))
