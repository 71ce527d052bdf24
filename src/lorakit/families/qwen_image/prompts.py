"""Qwen-Image's text conditioning, as diffusers' QwenImagePipeline / QwenImageEditPipeline and musubi-tuner build it.

The caption is put in the model's chat template and run through Qwen2.5-VL; the last hidden states of the
non-padding tokens, less the template's leading system turn (34 tokens; 64 for Edit, whose user turn opens with
the reference image), are the text tokens. For Edit the reference image goes through the VL encoder too: its
`<|image_pad|>` marker is expanded to one token per merged 2×2 group of 14-px patches, as transformers' processor
does (which lorakit cannot use: it needs torchvision).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from lorakit.families.common.ragged_cache import pad_rows

TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
DROP_TOKENS = {False: 34, True: 64}  # the template's leading tokens left out (text-to-image, Edit)
MAX_CAPTION_TOKENS = 1024  # diffusers' tokenizer_max_length
IMAGE_PAD = "<|image_pad|>"


class VLInputs:
    """Text and images as Qwen2.5-VL's processor turns them into model inputs (`__call__` has the processor's
    signature, so diffusers' Edit pipeline can use it as its `processor`)."""

    def __init__(self, tokenizer: Any, image_processor: Any | None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    def __call__(self, text: list[str], images: Any = None, padding: bool = True, return_tensors: str = "pt"):
        from transformers import BatchFeature

        extra: dict[str, torch.Tensor] = {}
        if images is not None:
            extra = dict(self.image_processor(images=images, return_tensors="pt"))
            text = self._expand_image_tokens(text, extra["image_grid_thw"])
        tokens = self.tokenizer(text, padding=padding, return_tensors=return_tensors)
        return BatchFeature({**tokens, **extra})

    def _expand_image_tokens(self, text: list[str], grids: torch.Tensor) -> list[str]:
        merge = self.image_processor.merge_size ** 2
        counts = iter(int(grid.prod()) // merge for grid in grids)
        expanded = []
        for line in text:
            parts = line.split(IMAGE_PAD)
            out = parts[0]
            for part in parts[1:]:
                out += IMAGE_PAD * next(counts) + part
            expanded.append(out)
        return expanded


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Pixels in [-1, 1] (B, 3, H, W) as the PIL images the processor reads (rounded as image files are)."""
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(a.permute(1, 2, 0).cpu().numpy())) for a in array]


def encode_prompts(encoder: torch.nn.Module, inputs: VLInputs, captions: list[str], references: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, D) text tokens and their (B, L) mask: each caption's tokens after the template's system turn, zero-padded
    to the longest. `references` (pixels in [-1, 1]) makes it the Edit encoding."""
    edit = references is not None
    template = EDIT_TEMPLATE if edit else TEMPLATE
    texts = [template.format(caption) for caption in captions]
    if edit:
        model_inputs = inputs(text=texts, images=to_pil(references))
    else:
        model_inputs = inputs.tokenizer(texts, max_length=MAX_CAPTION_TOKENS + DROP_TOKENS[False], padding=True,
                                        truncation=True, return_tensors="pt")
    device = encoder.device
    outputs = encoder(
        input_ids=model_inputs["input_ids"].to(device), attention_mask=model_inputs["attention_mask"].to(device),
        pixel_values=_maybe(model_inputs, "pixel_values", device, encoder.dtype),
        image_grid_thw=_maybe(model_inputs, "image_grid_thw", device, None), output_hidden_states=True,
    )
    mask = model_inputs["attention_mask"].to(device).bool()
    rows = [hidden[keep][DROP_TOKENS[edit]:] for hidden, keep in zip(outputs.hidden_states[-1], mask)]
    return pad_rows(rows)


def _maybe(inputs: Any, name: str, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor | None:
    value = inputs.get(name)
    if value is None:
        return None
    return value.to(device=device, dtype=dtype) if dtype is not None else value.to(device)
