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
Whole-model training added two: `before_step` (DreamBooth stops training the text encoder at a step) and
`file_suffix` (a checkpoint may be a diffusers folder, with no extension).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from lorakit.data.conditioning import ConditioningUse
    from lorakit.families.base import Components, ModelFamily
    from lorakit.sampling.prompts import SamplePrompt


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

    #: whether --fused_backward_pass / --blockwise_fused_optimizers / --fused_optimizer_groups apply to it
    steps_during_backward: bool

    def before_step(self, global_step: int) -> None:
        """Before each micro-batch of optimizer step `global_step` + 1 (0-based count of steps done): what
        trains may change with the step (DreamBooth's --stop_text_encoder_training turns the text encoder off);
        a function of the step alone, so a resumed run continues alike."""

    def file_suffix(self, cfg: Any) -> str:
        """What follows the stem in its file names (`.safetensors`), or "" for a folder (a diffusers model)."""

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

    def sample_pipeline(self, family: "ModelFamily", comps: "Components", sampler: str) -> Any:
        """The pipeline sample images come from (the family's, or one that also runs what is trained beside the
        model, such as a ControlNet)."""

    def sample_inputs(self, prompt: "SamplePrompt") -> tuple["SamplePrompt", dict[str, Any]]:
        """A sample prompt as this kind of training samples it (new tokens spelled out) and the pipeline's extra
        inputs for it (a control image)."""


class TrainingType(Protocol):
    """A kind of training as a command selects it, before anything loads: its checks, what its dataset needs,
    and how it builds its `Trainable` on the loaded model."""

    #: for messages and the plan ("LoRA", "textual inversion", "ControlNet")
    title: str
    #: what its datasets do with `conditioning_data_dir` (data/conditioning.py)
    conditioning: "ConditioningUse"

    def option_problems(self, cfg: Any, family: "ModelFamily") -> list[str]:
        """Its own option checks (every problem), run with the family's before any model loads."""

    def spec(self, cfg: Any, family: "ModelFamily") -> Any:
        """The `TargetSpec` the family loads for: which encoders train (so are not cached), T5 among them or not."""

    def trained_modules(self, cfg: Any, family: "ModelFamily", comps: "Components", spec: Any) -> list[nn.Module]:
        """Model parts whose own weights train: placed on the device in the precision they were loaded in."""

    def prepare_dataset(self, cfg: Any, dataset: Any) -> None:
        """Changes to the built dataset before training (textual inversion's caption replacements)."""

    def build(self, cfg: Any, spec: Any, family: "ModelFamily", comps: "Components", device: torch.device) -> Trainable:
        """The `Trainable` on the loaded, frozen model."""


class FrozenModelTraining:
    """Defaults of the training types that leave the model's own weights frozen (LoRA, textual inversion,
    ControlNet): the family loads for the adapter options of `cfg`, and no model part trains."""

    #: whether it can train subsets with `custom_attributes = {diff_output_preservation = true}` (it must switch
    #: what it trains off to get the base model's prediction: an adapter network can)
    preserves_outputs = False

    def spec(self, cfg: Any, family: "ModelFamily") -> Any:
        from lorakit.adapters.spec import target_spec_from_config

        return target_spec_from_config(cfg, family)

    def trained_modules(self, cfg: Any, family: "ModelFamily", comps: "Components", spec: Any) -> list[nn.Module]:
        return []


class TrainableDefaults:
    """What most `Trainable`s do where only some differ: nothing before a step (a fine-tune stops its text
    encoders there), files named with `--save_model_as`'s extension, samples from the family's own pipeline with
    the prompt as it is (a ControlNet adds its control image, textual inversion spells its token out), and the
    optimizer step after the backward pass (only a fine-tune steps during it, with --fused_backward_pass and the
    like)."""

    steps_during_backward = False

    def before_step(self, global_step: int) -> None:
        """Nothing changes during the run."""

    def file_suffix(self, cfg: Any) -> str:
        return f".{cfg.save_model_as}"

    def sample_pipeline(self, family: "ModelFamily", comps: "Components", sampler: str) -> Any:
        return family.pipeline(comps, sampler)

    def sample_inputs(self, prompt: "SamplePrompt") -> tuple["SamplePrompt", dict[str, Any]]:
        return prompt, {}

    @contextlib.contextmanager
    def switched_off(self) -> Iterator[None]:
        # the training types without an adapter refuse differential output preservation before anything loads
        # (`FrozenModelTraining.preserves_outputs`); reaching here is a bug, not a user's mistake
        raise RuntimeError(f"{type(self).__name__} cannot compute the base model's own prediction")
        yield
