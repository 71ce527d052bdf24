"""SD 1.x/2.x LoRA names: diffusers U-Net paths under `lora_unet`, CLIP (with the `text_model` level) under
`lora_te` — what sd-scripts' `networks.lora` writes and ComfyUI, A1111/Forge and diffusers read."""

from __future__ import annotations

from torch import nn

from lorakit.adapters.key_layout import KeyLayout
from lorakit.adapters.targets import clip_path_prefix
from lorakit.families.base import Components
from lorakit.families.common.lora_segments import CLIP_SEGMENTS, UNET_SEGMENTS


def _roots(components: Components) -> dict[str, tuple[nn.Module, str]]:
    encoder = components.text_encoders[0]
    return {"lora_unet": (components.denoiser, ""), "lora_te": (encoder, clip_path_prefix(encoder))}


LORA_LAYOUT = KeyLayout(
    family="sd",
    components={"lora_unet": "unet", "lora_te": "text_encoder"},
    segments=frozenset(UNET_SEGMENTS + CLIP_SEGMENTS),
    model_roots=_roots,
)
