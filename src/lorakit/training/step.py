"""One micro-batch's loss and the small helpers around an optimizer step (no model-family knowledge)."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator

from lorakit.data.batch import Batch
from lorakit.data.masks import mask_to_latent
from lorakit.training import distributed
from lorakit.transfer import to_device


def step_loss(session: Any, batch: Batch) -> torch.Tensor:
    """Encode, noise, predict and compare: the loss of one micro-batch, weighted per sample.

    Noise and timesteps come from `session.noise_generator`, whose state is part of a saved training state,
    so a resumed run draws exactly what the uninterrupted run drew.
    """
    family, comps, accelerator = session.family, session.comps, session.accelerator
    device = accelerator.device
    with torch.no_grad():
        if batch.latents is not None:
            latents = to_device(batch.latents, device, session.weight_dtype)
        else:
            latents = family.encode_images(comps, to_device(batch.images, device)).to(session.weight_dtype)
    with torch.set_grad_enabled(session.trainable.trains_text_encoders), accelerator.autocast():
        text = family.encode_text(comps, batch.captions, session.cfg.clip_skip)
    noised = session.objective.noise(latents, generator=session.noise_generator)
    with accelerator.autocast():
        prediction = family.predict(comps, noised.noisy, noised.timesteps, text, batch)
    elementwise = session.objective.elementwise_loss(prediction.float(), noised.target.float(), noised.timesteps)
    if batch.masks is not None:
        # --masked_loss / alpha_mask: weight each latent pixel by the mask, area-averaged to latent size
        elementwise = elementwise * mask_to_latent(to_device(batch.masks, device), tuple(elementwise.shape[-2:]))
    per_sample = elementwise.mean(dim=tuple(range(1, elementwise.ndim)))
    weights = to_device(batch.loss_weights, device, per_sample.dtype)
    timestep_weights = session.objective.loss_weights(noised.timesteps)
    if timestep_weights is not None:
        weights = weights * timestep_weights
    return (per_sample * weights).mean()


def set_sync_gradients(accelerator: Accelerator, sync: bool) -> None:
    """Tell accelerate whether this micro-batch ends an accumulation (its optimizer wrapper steps only then).

    The loop decides this itself, per epoch: every `gradient_accumulation_steps` batches and at the last batch
    of an epoch, so steps map to batches exactly as `lorakit.data.resume` assumes (accelerate's own counter
    would carry a partial accumulation over the epoch boundary, because the loader is not wrapped by it).
    """
    accelerator.gradient_state._set_sync_gradients(sync)


def ends_accumulation(index: int, batches_in_epoch: int, accumulation: int) -> bool:
    """Whether micro-batch `index` (0-based within its epoch) is the last of an optimizer step."""
    return (index + 1) % max(1, accumulation) == 0 or index + 1 == batches_in_epoch


def all_reduce_gradients(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """The LoRA modules live inside the frozen model, outside any DDP wrapper, so gradients are averaged here.

    Under DeepSpeed the engine that holds the network reduces them itself (in `accelerator.backward`).
    """
    if accelerator.num_processes <= 1 or distributed.uses_deepspeed(accelerator):
        return
    for param in params:
        if param.grad is not None:
            param.grad = accelerator.reduce(param.grad, reduction="mean")
