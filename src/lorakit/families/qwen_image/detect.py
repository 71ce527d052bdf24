"""Telling a Qwen-Image model from other checkpoints cheaply, for `--family auto` (nothing large is imported and
only a `.safetensors` header is read).

ComfyUI recognises a Qwen-Image transformer by `txt_norm.weight`; its single files (`qwen_image_bf16.safetensors`,
`qwen_image_edit_bf16.safetensors`) hold diffusers' names, bare or under `model.diffusion_model.`. Qwen-Image 2.1
(`txt_in.text_norm.weight`) is another architecture and is not claimed.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.families.common.headers import class_name, safetensors_keys

FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
MARKERS = ("txt_norm.weight", "img_in.weight", "txt_in.weight", "transformer_blocks.0.attn.add_q_proj.weight")
PIPELINE_PREFIX = "QwenImage"
TRANSFORMER_CLASS = "QwenImageTransformer2DModel"


def strip_prefix(key: str) -> str:
    for prefix in FILE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def keys_are_qwen_image(keys: list[str]) -> bool:
    names = {strip_prefix(k) for k in keys}
    return all(marker in names for marker in MARKERS)


def is_qwen_image_source(path: str | Path) -> bool:
    """A diffusers folder of a Qwen-Image pipeline (text-to-image or Edit) or transformer, or a single file
    with the Qwen-Image transformer's tensor names."""
    source = Path(path)
    if source.is_dir():
        pipeline = class_name(source / "model_index.json")
        if pipeline.startswith(PIPELINE_PREFIX) and pipeline in PIPELINES:
            return True
        return any(class_name(file) == TRANSFORMER_CLASS for file in (source / "transformer" / "config.json", source / "config.json"))
    keys = safetensors_keys(source)
    return keys is not None and keys_are_qwen_image(keys)


def pipeline_is_edit(folder: Path) -> bool:
    return "Edit" in class_name(folder / "model_index.json")


PIPELINES = ("QwenImagePipeline", "QwenImageEditPipeline")
