"""The validation loss: the held-out images (`--validation_split`) scored at fixed timesteps (inventory §8.4).

As sd-scripts: every validation batch (at most `--max_validation_steps` of them) is scored at the 4 timesteps
`linspace(min, max, 6)[1:-1]` (200, 400, 600, 800 by default; `--min_timestep`/`--max_timestep` move them), with
the trained modules in eval mode (no dropout), no gradients, and noise drawn from a generator seeded with
`--validation_seed` (else the run's seed) at the start of each validation, so the same weights always score the
same. The training RNG is left as it was. After a step (`--validate_every_n_steps`) the loop logs
`loss/validation/step_average` and `loss/validation/step_divergence` (the average minus the training loss's
moving average); after an epoch (every epoch, or every `--validate_every_n_epochs`) `loss/validation/
epoch_average` and `loss/validation/epoch_divergence`, at the epoch number, as sd-scripts logs epoch values.

Each validation's average is the mean of that validation's own losses (sd-scripts' first-epoch figure also
averages the validations before it, a side effect of reusing its moving-average recorder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lorakit.training.sample_events import eval_mode, preserved_rng
from lorakit.training.step import step_loss

VALIDATION_TIMESTEPS = 4
TRAIN_TIMESTEPS = 1000  # every objective lorakit trains (DDPM and flow matching) counts 1000 timesteps


def validation_timesteps(cfg: Any) -> list[int]:
    """The fixed timesteps each validation batch is scored at (numpy's integer linspace, as sd-scripts)."""
    low = cfg.min_timestep if cfg.min_timestep is not None else 0
    high = cfg.max_timestep if cfg.max_timestep is not None else TRAIN_TIMESTEPS
    return [int(t) for t in np.linspace(low, high, VALIDATION_TIMESTEPS + 2, dtype=int)[1:-1]]


@dataclass(frozen=True)
class ValidationRecord:
    """One validation: after a step ("step") or an epoch ("epoch"), at that step/epoch number."""

    kind: str
    number: int
    average: float
    divergence: float

    def logs(self) -> dict[str, float]:
        return {f"loss/validation/{self.kind}_average": self.average,
                f"loss/validation/{self.kind}_divergence": self.divergence}


class Validator:
    """Scores the held-out images; the loop asks when (`after_step`, `after_epoch`) and for the loss."""

    def __init__(self, session: Any, dataset: Any, handle: Any, seed: int):
        cfg = session.cfg
        self.session, self.dataset, self.handle, self.cfg = session, dataset, handle, cfg
        self.seed = cfg.validation_seed if cfg.validation_seed is not None else seed
        self.timesteps = validation_timesteps(cfg)
        self.objectives = [session.objective.at_timestep(t) for t in self.timesteps]
        batches = len(dataset) if dataset is not None else 0
        self.batches = min(batches, cfg.max_validation_steps) if cfg.max_validation_steps else batches

    @property
    def enabled(self) -> bool:
        return self.batches > 0

    def after_step(self, step: int) -> bool:
        every = self.cfg.validate_every_n_steps
        return self.enabled and bool(every) and step % every == 0

    def after_epoch(self, epoch: int) -> bool:
        every = self.cfg.validate_every_n_epochs
        return self.enabled and (every is None or epoch % every == 0)

    def loss(self) -> float:
        """The mean loss over the validation batches and timesteps."""
        session = self.session
        generator = torch.Generator(device=session.accelerator.device).manual_seed(self.seed)
        self.dataset.set_epoch(1)  # the same batches and caption processing every time
        comps = session.comps
        modules = [comps.denoiser, *comps.text_encoders, session.trainable.module]
        losses = []
        with preserved_rng(), eval_mode(modules, self.handle), torch.no_grad():
            for plan in self.dataset.batch_plans()[: self.batches]:
                batch = self.dataset[plan]
                losses += [step_loss(session, batch, objective, generator) for objective in self.objectives]
        return float(torch.stack(losses).float().mean())
