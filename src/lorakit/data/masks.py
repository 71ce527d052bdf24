"""Loss masks: alpha channels (`alpha_mask`) and bringing any mask to latent size (conditioning images give
masks too: `data/conditioning.py`).

A mask is a float tensor in [0, 1] (0-255 / 255) with the image's bucket size; the training loop shrinks it to
latent size with `mask_to_latent` and multiplies the element-wise loss by it (inventory §5.5).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lorakit.data.images import Placement, apply_placement


def _to_unit_tensor(channel: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(channel, dtype=np.float32) / 255.0)


def place_alpha(alpha: Image.Image | None, placement: Placement, interpolation: str | None = None) -> torch.Tensor:
    """An image's alpha channel (from `images.load_image_and_alpha`, decoded with the image itself) placed
    like the image, as (H, W) in [0, 1]; all ones when the image has no alpha."""
    if alpha is None:
        width, height = placement.box[2] - placement.box[0], placement.box[3] - placement.box[1]
        return torch.ones(height, width)
    return _to_unit_tensor(apply_placement(alpha, placement, interpolation))


def mask_to_latent(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Area-average a (B, H, W) or (B, 1, H, W) mask down to (B, 1, h, w) so it broadcasts over channels."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
    return F.interpolate(mask.float(), size=tuple(latent_hw), mode="area")
