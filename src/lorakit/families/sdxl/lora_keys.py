"""SDXL LoRA names: the original SGM U-Net paths under `lora_unet` (`input_blocks_4_1_transformer_blocks_0_...`),
CLIP-L under `lora_te1` and OpenCLIP-bigG under `lora_te2` — what ComfyUI, A1111/Forge, diffusers and sd-scripts
read for SDXL. The diffusers/PEFT layout keeps diffusers' U-Net paths, so the layout converts both ways."""

from __future__ import annotations

from functools import lru_cache

from lorakit.adapters.key_layout import KeyLayout
from lorakit.families.common.lora_segments import CLIP_SEGMENTS, UNET_SEGMENTS

SGM_SEGMENTS = (
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "op", "time_embed", "label_emb", "out",
)


@lru_cache(maxsize=1)
def _sgm_names():
    from lorakit.families.sdxl.loading import bundled_config
    from lorakit.families.sdxl.sgm_keys import SgmUnetNames

    # the block numbering of SDXL's U-Net; smaller test U-Nets with the same levels-per-block share it
    return SgmUnetNames(bundled_config("unet"))


def sgm_from_diffusers(path: str) -> str | None:
    try:
        return _sgm_names().module(path)
    except ValueError:
        return None


def sgm_to_diffusers(path: str) -> str | None:
    """`input_blocks.4.1.proj_in` -> `down_blocks.1.attentions.0.proj_in` (the inverse of `SgmUnetNames`)."""
    from lorakit.families.common.ldm_keys import UNET_RESNET
    from lorakit.families.sdxl.sgm_keys import SGM_UNET_TOP_LEVEL

    key = path + "."
    for diffusers, sgm in SGM_UNET_TOP_LEVEL.items():
        if key.startswith(sgm):
            return (diffusers + key[len(sgm):])[:-1]
    for diffusers_prefix, sgm_prefix, kind in sorted(_sgm_names().blocks, key=lambda row: -len(row[1])):
        if key.startswith(sgm_prefix):
            rest = key[len(sgm_prefix):]
            if kind == "resnet":
                for old, new in UNET_RESNET.items():
                    if rest.startswith(new):
                        rest = old + rest[len(new):]
                        break
            return (diffusers_prefix + rest)[:-1]
    return None


LORA_LAYOUT = KeyLayout(
    family="sdxl",
    components={"lora_unet": "unet", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"},
    segments=frozenset(UNET_SEGMENTS + SGM_SEGMENTS + CLIP_SEGMENTS),
    denoiser_to_diffusers=sgm_to_diffusers,
    denoiser_from_diffusers=sgm_from_diffusers,
)
