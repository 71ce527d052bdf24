"""The contract between the training loop and a model family.

The loop only ever talks to a `ModelFamily`; nothing in training/, data/ or adapters/ knows which
architecture it trains. Adding a family means one folder implementing this protocol plus one line in
`registry.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class Components:
    """The loaded pieces of a base model.

    `denoiser` is the network that predicts noise/velocity (U-Net or transformer); `text_encoders` and
    `tokenizers` are parallel lists; `extras` holds anything family-specific (e.g. a noise schedule).
    """

    denoiser: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class AdapterTarget:
    """One layer an adapter attaches to.

    `name` is the kohya module name (e.g. `lora_unet_down_blocks_0_attentions_0_proj_in`), `module` the
    `nn.Linear`/`nn.Conv2d`, `component` is "unet" or "text_encoder" (used for learning-rate groups), and
    `rank`/`alpha` the size chosen for it (LierLa vs C3Lier differ for 3x3 convs).
    """

    name: str
    module: nn.Module
    component: str
    rank: int
    alpha: float


@dataclass
class TextConditioning:
    """Text-encoder outputs for a batch; the family decides what is inside."""

    tensors: dict[str, torch.Tensor]

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "TextConditioning":
        return TextConditioning(
            {k: v.to(device=device, dtype=dtype if v.is_floating_point() and dtype else v.dtype) for k, v in self.tensors.items()}
        )


class ModelFamily(Protocol):
    """What a model family provides to the trainer."""

    name: str
    default_network_module: str  # what sd-scripts trains this family's LoRAs with (`ss_network_module` without the option)

    def load(self, cfg: Any) -> Components: ...

    def objective(self, cfg: Any, comps: Components) -> Any:
        """The noising rule and target (`lorakit.objectives`): `.noise(latents) -> NoisedBatch`."""

    def encode_images(self, comps: Components, images: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (B,3,H,W) -> scaled latents, ready for noising."""

    def decode_latents(self, comps: Components, latents: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, comps: Components, captions: list[str], clip_skip: int | None = None) -> TextConditioning: ...

    def predict(self, comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning, batch: Any) -> torch.Tensor:
        """The denoiser's output for the noisy latents."""

    def adapter_targets(self, comps: Components, cfg: Any) -> list[AdapterTarget]: ...

    def text_encoders_to_train(self, comps: Components, cfg: Any) -> list[nn.Module]: ...

    def enable_gradient_checkpointing(self, comps: Components, train_text_encoder: bool) -> None: ...

    def metadata(self, cfg: Any) -> dict[str, str]:
        """Family-specific `ss_*` metadata keys."""

    def modelspec_architecture(self, cfg: Any) -> tuple[str, str, tuple[int, int]]:
        """(modelspec architecture, implementation, default resolution)."""
