"""OFT: orthogonal finetuning with block-diagonal rotations of the output channels (sd-scripts `networks.oft`).

Qiu et al., "Controlling Text-to-Image Diffusion by Orthogonal Finetuning" (arXiv:2306.07280): the frozen weight
is multiplied by a learned orthogonal matrix, W' = R W, which keeps the angles between neurons (the
"hyperspherical energy") and therefore the pretrained model's behaviour under control. R is block-diagonal
with `num_blocks` blocks of size b = out / num_blocks (`--network_dim` is the number of blocks: the smaller it
is, the larger each block and the model), each parametrised by the Cayley transform

    Q = B − Bᵀ  (skew-symmetric),   R = (I + Q)(I − Q)⁻¹,

so B = 0 gives R = I and training starts from the base model. The constrained variant (COFT, §3.2) bounds
‖Q‖_F ≤ ε, rescaling Q when it grows past that; kohya's implementation uses ε = alpha · out (the paper
has alpha·out²), which is why `--network_alpha` is the constraint here and 1e-4 … 1e-2 is the recommended range.
At multiplier m the rotation is R_m = m·(R − I) + I (no longer orthogonal for m ≠ 1, but linear in m).

Computation order (sd-scripts' corrected version): R is applied to the weight, W' = R·W with the output
channels grouped into blocks, and the layer runs once with W' and its *unrotated* bias — a rotation of the
output (R·(Wx + b)) would wrongly rotate the bias too. The product is formed in float32 and cast back.

Files hold `<name>.oft_blocks` of shape (num_blocks, b, b) and the 0-d `<name>.alpha`, with the module prefix
`oft_unet_` (sd-scripts' name; A1111 ≥ 1.5 maps it onto `lora_unet_`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.base import AdapterModule

__all__ = ["OFTModule", "oft_merged_weight", "oft_rotation", "RECOMMENDED_CONSTRAINT"]

#: the range of --network_alpha that sd-scripts recommends for OFT
RECOMMENDED_CONSTRAINT = (1e-4, 1e-2)


def oft_rotation(blocks: torch.Tensor, constraint: float | None, multiplier: float = 1.0) -> torch.Tensor:
    """R_m = m·(R − I) + I per block, with R the Cayley transform of Q = B − Bᵀ rescaled to ‖Q‖_F ≤ constraint."""
    blocks = blocks.float()
    q = blocks - blocks.transpose(1, 2)
    if constraint:
        norm = torch.linalg.vector_norm(q)
        # rescale only when the norm exceeds the bound; the 1e-8 keeps the ratio finite at Q = 0
        q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype).expand_as(q)
    rotation = torch.linalg.solve(eye - q, eye + q, left=False)  # (I + Q)(I − Q)⁻¹ without forming the inverse
    return multiplier * (rotation - eye) + eye


def oft_merged_weight(weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Block-diagonal R applied to the output channels of W (any trailing shape), in float32."""
    num_blocks, block_size, _ = rotation.shape
    grouped = weight.float().reshape(num_blocks, block_size, -1)
    return torch.einsum("kij,kjn->kin", rotation.float(), grouped).reshape(weight.shape)


class OFTModule(AdapterModule):
    """Orthogonal finetuning of one `nn.Linear` or `nn.Conv2d`: `num_blocks` Cayley rotations of its outputs."""

    def __init__(self, name: str, org_module: nn.Module, num_blocks: int, alpha: float | None, *, multiplier: float = 1.0):
        super().__init__(name, org_module, multiplier)
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{name}: OFT can wrap nn.Linear or nn.Conv2d, not {type(org_module).__name__}")
        out_dim = org_module.weight.shape[0]
        if num_blocks <= 0 or out_dim % num_blocks:
            raise ValueError(
                f"{name}: OFT needs the output size {out_dim} to be divisible by the number of blocks "
                f"(--network_dim {num_blocks})"
            )
        self.num_blocks = int(num_blocks)
        self.block_size = out_dim // self.num_blocks
        self.out_dim = out_dim
        self.is_conv = isinstance(org_module, nn.Conv2d)
        device = org_module.weight.device
        self.oft_blocks = nn.Parameter(torch.zeros(self.num_blocks, self.block_size, self.block_size, device=device))
        self.register_buffer("alpha", torch.tensor(float(alpha or 0.0), device=device))

    @property
    def constraint(self) -> float:
        """ε = alpha · out (0 switches the constraint off)."""
        return float(self.alpha) * self.out_dim

    def rotation(self, multiplier: float | None = None) -> torch.Tensor:
        m = self.multiplier if multiplier is None else multiplier
        return oft_rotation(self.oft_blocks, self.constraint, m)

    def merged_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        return oft_merged_weight(self.org_module.weight, self.rotation(multiplier))

    def delta_weight(self) -> torch.Tensor:
        weight = self.org_module.weight
        return self.merged_weight(1.0) - weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.multiplier == 0.0:
            return self.original_forward(x)
        layer = self.org_module
        weight = oft_merged_weight(layer.weight, self.rotation()).to(x.dtype)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        if self.is_conv:
            if layer.padding_mode != "zeros":
                raise ValueError(f"{self.lora_name}: OFT supports zero-padded convolutions only")
            return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"name={self.lora_name}, blocks={self.num_blocks}x{self.block_size}, alpha={float(self.alpha):g}"
