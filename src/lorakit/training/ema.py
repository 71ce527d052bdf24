"""An exponential moving average of the trained weights (`--ema_decay`, `--ema_update_every`).

sd-scripts has none; OneTrainer's users rely on it for fine-tunes. After every `update_every`-th optimizer step
each average moves towards its weight: ema ← decay·ema + (1 − decay)·weight, computed in float32 whatever the
weights' dtype. The averages are buffers of an `nn.Module`, so they are part of the training state (saved and
resumed exactly) and follow the weights' device. `swapped_in` puts them in the weights' place for a save
(pointer swaps, no copy).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class WeightAverage(nn.Module):
    def __init__(self, params: list[nn.Parameter], decay: float, update_every: int):
        super().__init__()
        self.params, self.decay, self.update_every = params, decay, update_every
        for index, param in enumerate(params):
            self.register_buffer(f"average_{index}", param.detach().float().clone())

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        """Moves follow the weights; casts do not: the averages stay float32 (--full_bf16 casts the weights)."""
        super()._apply(fn, recurse)
        for name, buffer in self._buffers.items():
            if buffer is not None and buffer.dtype != torch.float32:
                self._buffers[name] = buffer.float()
        return self

    def averages(self) -> list[torch.Tensor]:
        return [getattr(self, f"average_{index}") for index in range(len(self.params))]

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Step `step` (1-based) was just taken."""
        if step % self.update_every:
            return
        for average, param in zip(self.averages(), self.params):
            average.lerp_(param.detach().to(average.device, torch.float32), 1.0 - self.decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The weights read as the averages (in their own dtype) until the block ends."""
        originals = [param.data for param in self.params]
        try:
            for param, average in zip(self.params, self.averages()):
                param.data = average.to(param.dtype) if param.dtype != average.dtype else average
            yield
        finally:
            for param, original in zip(self.params, originals):
                param.data = original
