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

Computation order (sd-scripts' corrected version): the rotation is applied to the weight, with the output
channels grouped into blocks, and the layer runs once with W' and its *unrotated* bias — a rotation of the
output (R·(Wx + b)) would wrongly rotate the bias too. The product is formed in float32 and cast back. Which
side of the block the file's B sits on follows every reader of OFT files (sd-scripts `networks.oft` and
`oft_flux`, ComfyUI, A1111, LyCORIS: `einsum("k n m, k n ... -> k m ...", R, W)`): W' = Rᵀ·W per block.

Files hold `<name>.oft_blocks` of shape (num_blocks, b, b) and the 0-d `<name>.alpha`, with the module prefix
`oft_unet_` (sd-scripts' name; A1111 ≥ 1.5 maps it onto `lora_unet_`).

`networks.oft_flux` (sd-scripts) splits a layer into parts: BFL's fused `qkv` into q, k, v and a single
block's `linear1` into q, k, v and the MLP input. Each part is rotated on its own rows with `num_blocks`
blocks (every part must divide by it) and the constraint alpha·(part size), and the file holds one tensor per
part, `<name>.oft_blocks.<i>` (an unfused layer has the one part `oft_blocks.0`). The parts' rotations
together are one block-diagonal rotation of the fused layer's output rows whose blocks do not cross the parts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.base import AdapterModule, base_weight, is_fused_view

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
    # (I + Q)(I − Q)⁻¹ without forming the inverse. I − Q is never singular (Q is skew-symmetric: its eigenvalues
    # are imaginary), so solve_ex skips linalg.solve's singularity check, which waits for the GPU in every forward
    rotation = torch.linalg.solve_ex(eye - q, eye + q, left=False).result
    return multiplier * (rotation - eye) + eye


def oft_merged_weight(weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """The block-diagonal rotation applied to the output channels of W (any trailing shape), in float32:
    W'[k, m] = Σ_n R[k, n, m]·W[k, n] (Rᵀ·W per block, the readers' convention)."""
    num_blocks, block_size, _ = rotation.shape
    grouped = weight.float().reshape(num_blocks, block_size, -1)
    return torch.einsum("knm,knp->kmp", rotation.float(), grouped).reshape(weight.shape)


class OFTModule(AdapterModule):
    """Orthogonal finetuning of one `nn.Linear` or `nn.Conv2d`: `num_blocks` Cayley rotations of its outputs.

    With `parts` (output sizes summing to the layer's, `networks.oft_flux`) each part gets its own
    `num_blocks` rotations, stored as `oft_blocks.<i>`; without, one `oft_blocks` tensor (`networks.oft`).
    """

    def __init__(self, name: str, org_module: nn.Module, num_blocks: int, alpha: float | None, *,
                 parts: Sequence[int] | None = None, multiplier: float = 1.0):
        super().__init__(name, org_module, multiplier)
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{name}: OFT can wrap nn.Linear or nn.Conv2d, not {type(org_module).__name__}")
        out_dim = org_module.weight.shape[0]
        sizes = [out_dim] if parts is None else [int(p) for p in parts]
        if sum(sizes) != out_dim:
            raise ValueError(f"{name}: the parts {sizes} do not add up to the output size {out_dim}")
        if num_blocks <= 0 or any(size % num_blocks for size in sizes):
            what = f"the output size {out_dim}" if len(sizes) == 1 else f"every part of this fused layer (sizes {', '.join(map(str, sizes))})"
            raise ValueError(f"{name}: OFT needs {what} to be divisible by the number of blocks (--network_dim {num_blocks})")
        self.num_blocks = int(num_blocks)
        self.part_sizes = sizes
        self.block_size = sizes[0] // self.num_blocks
        self.out_dim = out_dim
        self.is_conv = isinstance(org_module, nn.Conv2d)
        device = org_module.weight.device
        blocks = [nn.Parameter(torch.zeros(self.num_blocks, s // self.num_blocks, s // self.num_blocks, device=device)) for s in sizes]
        self.oft_blocks = blocks[0] if parts is None else nn.ParameterList(blocks)
        self.register_buffer("alpha", torch.tensor(float(alpha or 0.0), device=device))
        # the forward reads alpha as a number; reading the buffer (on the GPU) every step would wait for the GPU
        self.alpha_value = float(alpha or 0.0)
        self.register_load_state_dict_post_hook(lambda module, _incompatible: module.refresh_alpha())

    def refresh_alpha(self) -> None:
        """Re-read `alpha` after it changed (loaded by `load_state_dict` or from a kohya file)."""
        self.alpha_value = float(self.alpha)

    def after_load(self) -> None:
        self.refresh_alpha()

    @property
    def constraint(self) -> float:
        """ε = alpha · out (0 switches the constraint off); per part with `parts`, alpha · part size."""
        return self.alpha_value * self.out_dim

    def _blocks_by_part(self) -> list[tuple[torch.Tensor, int]]:
        if isinstance(self.oft_blocks, nn.ParameterList):
            return list(zip(self.oft_blocks, self.part_sizes))
        return [(self.oft_blocks, self.out_dim)]

    def rotation(self, multiplier: float | None = None) -> torch.Tensor:
        """R_m of the (first) part: (num_blocks, b, b)."""
        return self.rotations(multiplier)[0]

    def rotations(self, multiplier: float | None = None) -> list[torch.Tensor]:
        m = self.multiplier if multiplier is None else multiplier
        return [oft_rotation(blocks, self.alpha_value * size, m) for blocks, size in self._blocks_by_part()]

    def merged_weight(self, multiplier: float = 1.0, weight: torch.Tensor | None = None) -> torch.Tensor:
        """W' = Rᵀ·W per part; `weight` is the layer's W when the caller has read it already (a fused view builds
        it anew on every read)."""
        weight = base_weight(self.org_module) if weight is None else weight
        rows = torch.split(weight, self.part_sizes, dim=0)
        merged = [oft_merged_weight(w, r) for w, r in zip(rows, self.rotations(multiplier))]
        return merged[0] if len(merged) == 1 else torch.cat(merged, dim=0)

    def delta_weight(self) -> torch.Tensor:
        weight = base_weight(self.org_module)
        return self.merged_weight(1.0, weight) - weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.multiplier == 0.0:
            return self.original_forward(x)
        layer, base = self.org_module, base_weight(self.org_module)
        merged = self.merged_weight(self.multiplier, base)
        if is_fused_view(layer):  # the parts compute W x + b themselves: add only (W' − W) x
            return F.linear(x, (merged - base.float()).to(x.dtype))
        weight = merged.to(x.dtype)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        if self.is_conv:
            if layer.padding_mode != "zeros":
                raise ValueError(f"{self.lora_name}: OFT supports zero-padded convolutions only")
            return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        parts = "" if len(self.part_sizes) == 1 else f", parts={self.part_sizes}"
        return f"name={self.lora_name}, blocks={self.num_blocks}x{self.block_size}{parts}, alpha={float(self.alpha):g}"
