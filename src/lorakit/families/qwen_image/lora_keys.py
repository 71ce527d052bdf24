"""Qwen-Image LoRA names: diffusers' (= ComfyUI's = the official) module paths under `lora_unet`, as musubi-tuner's
`networks.lora_qwen_image` writes them (`lora_unet_transformer_blocks_0_attn_to_q`). ComfyUI reads these through
its generic `lora_unet_` table (its Qwen-Image model keeps diffusers' names); diffusers converts them on load."""

from __future__ import annotations

from lorakit.adapters.key_layout import KeyLayout

SEGMENTS = (
    "transformer_blocks", "attn", "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out",
    "to_add_out", "img_mlp", "txt_mlp", "net", "proj", "img_mod", "txt_mod", "img_in", "txt_in", "proj_out",
    "norm_out", "linear", "time_text_embed", "timestep_embedder", "linear_1", "linear_2",
)

LORA_LAYOUT = KeyLayout(
    family="Qwen-Image",
    components={"lora_unet": "transformer"},
    segments=frozenset(SEGMENTS),
    model_roots=lambda comps: {"lora_unet": (comps.denoiser, "")},
)
