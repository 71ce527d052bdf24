"""LoRA-GGPO: gradient-guided perturbation of a LoRA layer's output (sd-scripts' `networks.lora_flux`,
`ggpo_sigma` and `ggpo_beta`).

Chang et al., "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via Gradient-Guided Perturbation
Optimization" (arXiv:2502.14538). While training, the layer's output gets a random weight perturbation P applied
to its input on top of the LoRA branch:

    y = W x + m·(alpha/r)·B A x + x Pᵀ,   P[o, i] ~ N(0, 1) · (σ·c_o + β·g_o²) / √out_features,

where for each output row o, c_o = √(w̄² + ‖(B A)[o]‖²) combines the frozen weight's mean row norm w̄ with the
LoRA product's row norm, and g_o = ‖(alpha/r)·(B ∂A + ∂B A)[o]‖ is the row norm of the gradient the product got
in the last step. P is drawn anew at every forward and carries no gradient.

The norms are measured once per optimizer step, after the gradients are reduced and clipped and before the
optimizer uses them (`before_optimizer_step`, driven by the run's Trainable), so the first step trains without a
perturbation, as in sd-scripts. Kept from sd-scripts on purpose, so runs match:

* c_o takes the product B A without its alpha/r scale (sd-scripts' scaling of it is not in place);
* g_o uses the (alpha/r)-scaled product of gradient and weight;
* layers where lora_flux splits one LoRA into parts (`split_qkv`) get no perturbation.

One difference: w̄ is the mean over every row of W; sd-scripts estimates it from at most 1000 randomly chosen rows
(the same value for layers of up to 1000 rows).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lorakit.adapters.base import AdapterModule, branch_input
from lorakit.adapters.lora import LoRAModule

__all__ = ["GGPOLoRAModule", "ggpo_logs", "mean_row_norm"]


@torch.no_grad()
def mean_row_norm(weight: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The mean L2 norm of the rows of a 2-D weight (in float32, a chunk of rows at a time: fp8 and bf16 weights
    are not copied whole)."""
    total = torch.zeros((), dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], chunk):
        total += weight[start:start + chunk].float().norm(dim=1).sum()
    return total / weight.shape[0]


class GGPOLoRAModule(LoRAModule):
    """A LoRA branch on an `nn.Linear` (or a fused view of linears) with LoRA-GGPO's output perturbation."""

    def __init__(self, name: str, org_module: nn.Module, rank: int, alpha: float | None = None, *,
                 sigma: float, beta: float, **kwargs):
        super().__init__(name, org_module, rank, alpha, **kwargs)
        if not isinstance(org_module, nn.Linear):
            raise TypeError(f"{name}: LoRA-GGPO perturbs linear layers only, not {type(org_module).__name__}")
        self.sigma, self.beta = float(sigma), float(beta)
        weight = org_module.weight  # a fused view builds it once here
        self.org_shape = tuple(weight.shape)
        self.norm_factor = 1.0 / math.sqrt(self.org_shape[0])
        # not state (sd-scripts saves none of GGPO's norms), but it follows the module to its device
        self.register_buffer("org_norm", mean_row_norm(weight.detach()), persistent=False)
        # per output row, (out, 1); None until the first optimizer step has measured them
        self.weight_norms: torch.Tensor | None = None
        self.combined_norms: torch.Tensor | None = None
        self.grad_norms: torch.Tensor | None = None

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Measure the norms the next forwards use, from this step's weights and (reduced, clipped) gradients."""
        if not self.training:
            return
        down, up = self.lora_down.weight, self.lora_up.weight
        product = up.float() @ down.float()
        self.weight_norms = product.norm(dim=1, keepdim=True)
        self.combined_norms = torch.sqrt(self.org_norm.float() ** 2 + product.pow(2).sum(dim=1, keepdim=True))
        if down.grad is not None and up.grad is not None:
            grad = self.scale * (up.float() @ down.grad.float() + up.grad.float() @ down.float())
            self.grad_norms = grad.norm(dim=1, keepdim=True)

    def perturbation_scale(self) -> torch.Tensor:
        """(σ·c + β·g²)/√out per output row, (out, 1)."""
        return (self.sigma * self.combined_norms + self.beta * self.grad_norms.pow(2)) * self.norm_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if not (self.training and self.combined_norms is not None and self.grad_norms is not None):
            return out
        with torch.no_grad():
            weight = self.lora_down.weight
            noise = torch.randn(self.org_shape, dtype=weight.dtype, device=weight.device)
            noise.mul_(self.perturbation_scale().to(noise.dtype))
            shift = branch_input(x, noise.dtype) @ noise.T
        return out + shift.to(out.dtype)


def ggpo_logs(modules: Iterable[AdapterModule]) -> dict[str, float]:
    """sd-scripts' `norm/avg_key_norm`, `norm/avg_grad_norm` and `norm/avg_combined_norm` (the mean over the layers
    of each layer's mean over its rows), once the norms exist."""
    layers = [m for m in modules if isinstance(m, GGPOLoRAModule) and m.weight_norms is not None]
    if not layers:
        return {}
    logs = {"norm/avg_key_norm": float(torch.stack([m.weight_norms.mean() for m in layers]).mean()),
            "norm/avg_combined_norm": float(torch.stack([m.combined_norms.mean() for m in layers]).mean())}
    grads = [m.grad_norms.mean() for m in layers if m.grad_norms is not None]
    if grads:
        logs["norm/avg_grad_norm"] = float(torch.stack(grads).mean())
    return logs
