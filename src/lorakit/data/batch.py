"""The typed batch the data pipeline hands to the training loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One batch drawn from a single bucket (all images share one size).

    Exactly one of `images` (pixels in [-1, 1], B x 3 x H x W) and `latents` (cached, already scaled by the
    family's VAE factor) is set. `loss_weights` is 1 for training images and `prior_loss_weight` for
    regularisation images. Sizes are (height, width) pairs, as SDXL's size conditioning wants them.
    """

    captions: list[str]
    loss_weights: torch.Tensor
    images: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    original_sizes: list[tuple[int, int]] | None = None
    crop_top_lefts: list[tuple[int, int]] | None = None
    target_sizes: list[tuple[int, int]] | None = None
    masks: torch.Tensor | None = None  # (B, 1, H, W) loss masks in [0, 1] at pixel size; see data.masks
    #: (B, 3, H, W) conditioning images in [-1, 1], placed like `images` (data.conditioning); None without
    conditioning_images: torch.Tensor | None = None
    custom_attributes: list[dict] | None = None  # each image's subset `custom_attributes` table ({} when none)

    def __len__(self) -> int:
        return len(self.captions)
