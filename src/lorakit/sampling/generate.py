"""Image generation with a family's pipeline, used for samples during training and by the demo."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from lorakit.families.base import Components, ModelFamily
from lorakit.sampling.prompts import SamplePrompt
from lorakit.families.common.prompt_weighting import encode_weighted_prompts, plain_text


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


def takes_weighted_embeddings(pipe: Any) -> bool:
    """Whether our weighted-prompt encoder fits the pipeline: one CLIP text encoder that accepts prompt_embeds.

    Pipelines with a second encoder or pooled embeddings (SDXL, SD3, FLUX), or whose one encoder is a language
    model rather than CLIP, get the prompt text without the weighting syntax instead.
    """
    encoder = getattr(pipe, "text_encoder", None)
    has_single_clip = encoder is not None and getattr(pipe, "tokenizer", None) is not None and "CLIP" in type(encoder).__name__
    has_more = any(getattr(pipe, name, None) is not None for name in ("text_encoder_2", "text_encoder_3"))
    return has_single_clip and not has_more


def _prompt_kwargs(pipe: Any, prompt: SamplePrompt, clip_skip: int | None) -> dict[str, Any]:
    if takes_weighted_embeddings(pipe):
        embeds = encode_weighted_prompts(pipe.text_encoder, pipe.tokenizer, [prompt.prompt, prompt.negative_prompt], clip_skip)
        return {"prompt_embeds": embeds[:1], "negative_prompt_embeds": embeds[1:]}
    negative = plain_text(prompt.negative_prompt) if prompt.negative_prompt else None
    return {"prompt": plain_text(prompt.prompt), "negative_prompt": negative}


@torch.no_grad()
def generate_sample(pipe: Any, prompt: SamplePrompt, *, clip_skip: int | None = None,
                    inputs: dict[str, Any] | None = None, output_type: str = "pil") -> Any:
    """One image for a sample prompt; a prompt with a seed gives the same image on every device. `inputs` are
    the pipeline's further inputs (a control image); `output_type` "np" gives the floats instead of a picture."""
    generator = torch.Generator(device="cpu").manual_seed(prompt.seed) if prompt.seed is not None else None
    kwargs = {**_prompt_kwargs(pipe, prompt, clip_skip), **(inputs or {})}
    if prompt.guidance_scale is not None:
        kwargs["guidance_scale_embedded"] = prompt.guidance_scale
    return _call_pipeline(pipe, kwargs, prompt, generator, output_type)


def _call_pipeline(pipe: Any, kwargs: dict[str, Any], prompt: SamplePrompt, generator: Any, output_type: str) -> Any:
    import inspect

    accepted = getattr(pipe, "accepted_inputs", None) or inspect.signature(pipe.__call__).parameters
    embedded = kwargs.pop("guidance_scale_embedded", None)
    if embedded is not None and "guidance" in accepted:
        kwargs["guidance"] = embedded  # FLUX-style embedded guidance (--g), where the pipeline has it
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    # a pipeline whose `guidance_scale` is an optional embedded value (default None) takes the CFG scale as
    # `true_cfg_scale`; the others (FLUX's default 3.5 included) as `guidance_scale`, as before
    embedded_only = "true_cfg_scale" in accepted and accepted["guidance_scale"].default is None
    kwargs["true_cfg_scale" if embedded_only else "guidance_scale"] = prompt.scale
    out = pipe(
        **kwargs, num_inference_steps=prompt.sample_steps, width=prompt.width, height=prompt.height,
        generator=generator, output_type=output_type,
    )
    return out.images[0]
