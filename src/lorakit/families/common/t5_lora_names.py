"""Where a diffusers-layout LoRA file keeps T5's modules.

diffusers ignores T5 LoRA keys whatever their names, and ComfyUI maps T5 modules only from kohya names
(`lora_te3_…`, FLUX also `lora_te2_…`) or from its generic `text_encoders.t5xxl.transformer.<module path>`;
diffusers-style `text_encoder_3.encoder…` / `text_encoder_2.encoder…` names are dropped there with "lora key not
loaded". So the diffusers layout written by lorakit puts T5 under ComfyUI's generic name (the module path is
transformers' T5 path in both), which neither diffusers' loader nor its prefix filters mistake for one of its
components, and lorakit reads both spellings back.
"""

from __future__ import annotations

COMFY_T5_PREFIX = "text_encoders.t5xxl.transformer"


def t5_file_path(module_path: str) -> str:
    """`encoder.block.0.layer.0.SelfAttention.q` -> the name a diffusers-layout file gives it."""
    return f"{COMFY_T5_PREFIX}.{module_path}"


def t5_module_path(file_path: str) -> str | None:
    """The T5 module path of a diffusers-layout name written under ComfyUI's generic prefix, else None."""
    prefix = COMFY_T5_PREFIX + "."
    return file_path[len(prefix):] if file_path.startswith(prefix) else None
