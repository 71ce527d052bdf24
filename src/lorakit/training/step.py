"""One micro-batch's loss and the small helpers around an optimizer step (no model-family knowledge)."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator

from lorakit.data.batch import Batch
from lorakit.data.masks import mask_to_latent
from lorakit.training import distributed
from lorakit.transfer import to_device


def step_loss(session: Any, batch: Batch, objective: Any = None, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """Encode, noise, predict and compare: the loss of one micro-batch, weighted per sample.

    Noise and timesteps come from `session.noise_generator`, whose state is part of a saved training state,
    so a resumed run draws exactly what the uninterrupted run drew. The validation loss passes its own
    objective (fixed timesteps) and generator.
    """
    family, comps, accelerator = session.family, session.comps, session.accelerator
    objective = objective or session.objective
    generator = generator or session.noise_generator
    device = accelerator.device
    with torch.no_grad():
        if batch.latents is not None:
            latents = to_device(batch.latents, device, session.weight_dtype)
        else:
            latents = family.encode_images(comps, to_device(batch.images, device)).to(session.weight_dtype)
    # trained text encoders run with gradients, except under an outer no_grad (the validation loss)
    with torch.set_grad_enabled(session.trainable.trains_text_encoders and torch.is_grad_enabled()), accelerator.autocast():
        text = family.encode_text(comps, batch.captions, session.cfg.clip_skip)
    noised = objective.noise(latents, generator=generator)
    with accelerator.autocast():
        prediction = family.predict(comps, noised.noisy, noised.timesteps, text, batch)
    target = preserved_target(session, batch, noised, text)
    elementwise = objective.elementwise_loss(prediction.float(), target.float(), noised.timesteps)
    if batch.masks is not None:
        # --masked_loss / alpha_mask: weight each latent pixel by the mask, area-averaged to latent size
        elementwise = elementwise * mask_to_latent(to_device(batch.masks, device), tuple(elementwise.shape[-2:]))
    per_sample = elementwise.mean(dim=tuple(range(1, elementwise.ndim)))
    weights = to_device(batch.loss_weights, device, per_sample.dtype)
    timestep_weights = objective.loss_weights(noised.timesteps)
    if timestep_weights is not None:
        weights = weights * timestep_weights
    return (per_sample * weights).mean()


def preserved_target(session: Any, batch: Batch, noised: Any, text: Any) -> torch.Tensor:
    """The target, where images of a subset with `custom_attributes = {diff_output_preservation = true}` learn
    the model's own prediction without what is being trained (sd-scripts' differential output preservation: the
    trained weights are switched off for one more forward pass, without gradients)."""
    rows = [i for i, attributes in enumerate(batch.custom_attributes or []) if attributes.get("diff_output_preservation")]
    if not rows:
        return noised.target
    with torch.no_grad(), session.trainable.switched_off(), session.accelerator.autocast():
        prior = session.family.predict(session.comps, noised.noisy, noised.timesteps, text, batch)
    target = noised.target.clone()
    target[rows] = prior[rows].to(target.dtype)
    return target


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
