"""`Trainable`: what a run trains. The loop, checkpoints, training states, sampling and metadata speak to it
and never ask which kind it is.

A LoRA network (any adapter algorithm, `network_trainable.py`) is the first implementation. The interface is
shaped so that the other kinds of training the system has are each one more implementation:

* the denoiser's and text encoders' own weights (full fine-tune, DreamBooth): `module` is the model part that
  trains (its parameters get `requires_grad`), `parameter_groups` gives U-Net and text-encoder LRs (sd-scripts'
  `--learning_rate_te*`, `--block_lr`), `save` writes the whole checkpoint in the layout it came in through the
  family's whole-model writers, `metadata` the ModelSpec of a checkpoint;
* new token embeddings (textual inversion): `module` holds the new rows only, `after_optimizer_step` puts the
  other rows of the embedding table back, `save` writes `emb_params` / `clip_l`+`clip_g` files;
* a ControlNet: `module` is the ControlNet; the family's `predict` feeds its residuals when the trainable is
  attached to the components.

Why these members: everything the loop did with the LoRA network before was one of them — build optimizer
groups, clip and reduce gradients over its parameters, apply max-norm after a step, save its file with metadata,
hold its tensors in a training state, switch modes around sampling — so the loop needs nothing more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


class Trainable(Protocol):
    """The weights a run trains, attached to the loaded model."""

    #: holds every trained parameter and buffer: it is put on the device, wrapped for DeepSpeed, and its
    #: `state_dict()` is the model part of a training state (saved and restored exactly)
    module: nn.Module
    #: the text encoders run with gradients (some of what trains is in them)
    trains_text_encoders: bool

    def parameter_groups(self, cfg: Any) -> tuple[list[dict[str, Any]], list[str]]:
        """Optimizer parameter groups (with their learning rates) and a name for each (for LR logging)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters gradients are reduced and clipped over."""

    def after_optimizer_step(self, cfg: Any) -> dict[str, float]:
        """Work after every optimizer step (e.g. max-norm); returns values to log (empty when none)."""

    def switched_off(self) -> Any:
        """A context in which the model computes as if nothing were trained (the base model's own prediction, for
        sd-scripts' differential output preservation, `custom_attributes`)."""

    def metadata(self, cfg: Any) -> dict[str, str]:
        """The keys this kind of file adds to the run's shared metadata (e.g. `ss_network_dim`)."""

    @property
    def modelspec_kind(self) -> str:
        """The ModelSpec architecture suffix of its files (`lora`, `textual-inversion`, ...)."""

    def save(self, path: Path, metadata: dict[str, str], save_dtype: torch.dtype | None, model_format: str) -> None:
        """Write its file (atomically) in its own format, with `metadata`."""
