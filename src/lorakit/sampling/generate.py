"""Image generation with a family's pipeline, used for samples during training and by the demo."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from lorakit.families.base import Components, ModelFamily


@torch.no_grad()
def generate(
    family: ModelFamily,
    comps: Components,
    prompts: list[str],
    *,
    seed: int,
    steps: int = 20,
    guidance_scale: float = 7.5,
    width: int = 512,
    height: int = 512,
    negative_prompt: str | None = None,
    sampler: str = "ddim",
) -> list[Image.Image]:
    """One image per prompt, each from its own seed (seed + index), so a prompt's image does not depend on the others."""
    pipe: Any = family.pipeline(comps, sampler)
    images = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(seed + index)
        out = pipe(
            prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
            width=width, height=height, generator=generator, output_type="pil",
        )
        images.append(out.images[0])
    return images


def image_grid(rows: list[list[Image.Image]], gap: int = 2, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Tile images (all the same size) into one picture, row by row."""
    width, height = rows[0][0].size
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (columns * (width + gap) - gap, len(rows) * (height + gap) - gap), background)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (c * (width + gap), r * (height + gap)))
    return grid
