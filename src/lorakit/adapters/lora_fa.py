"""LoRA-FA: LoRA with a frozen, randomly initialised down projection (sd-scripts `networks.lora_fa`).

Zhang et al., "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning"
(arXiv:2308.03303): A is drawn once and frozen, only B (initialised to zero) is trained, so ΔW = (alpha/r)·B A
always lies in the fixed r-dimensional row space of A and the activations saved for the backward pass are the
r-dimensional A x instead of the full input. A is drawn from N(0, 2/(fan_in + r)) (Xavier normal), as in
sd-scripts, so that A x keeps roughly the scale of x.

Files are ordinary kohya LoRA files (`lora_down.weight` holds the frozen A): every LoRA loader reads them.
"""

from __future__ import annotations

from torch import nn

from lorakit.adapters.lora import LoRAModule

__all__ = ["LoRAFAModule"]


class LoRAFAModule(LoRAModule):
    """A LoRA module whose `lora_down` is frozen after a Xavier-normal draw."""

    def init_factors(self) -> None:
        nn.init.xavier_normal_(self.lora_down.weight)
        nn.init.zeros_(self.lora_up.weight)
        self.lora_down.weight.requires_grad_(False)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", frozen_down=True"
