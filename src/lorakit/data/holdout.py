"""`--validation_split` / the dataset key `validation_split`: images held out of training for the validation loss.

sd-scripts' rule, so the same images are held out for the same seed: each non-regularisation subset's images, in
file-name order, are shuffled with Python's `random` seeded by `validation_seed` (else the run's seed); training
keeps the first ceil(n·(1 − split)) and validation takes the last n − round(n·split). For some sizes the two
overlap by one image (n = 3, split 0.5: training 0–1, validation 1–2), as in sd-scripts; a warning says so.
Regularisation subsets are never split: training keeps them whole and validation has none of them. Validation
images count once (no repeats).
"""

from __future__ import annotations

import logging
import math
import random
from typing import Sequence, TypeVar

logger = logging.getLogger(__name__)

TRAINING, VALIDATION = "training", "validation"
Item = TypeVar("Item")


def held_out_indices(count: int, fraction: float, seed: int, role: str) -> list[int]:
    """Which of `count` images (by position) the `role` side of the split keeps, in shuffled order."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    training_end = math.ceil(count * (1 - fraction))
    validation_start = count - round(count * fraction)
    if role == VALIDATION and validation_start < training_end:
        logger.warning("validation_split %s of %d images: %d image(s) are both trained on and validated on "
                       "(sd-scripts' rounding)", fraction, count, training_end - validation_start)
    return order[:training_end] if role == TRAINING else order[validation_start:]


def split_items(items: Sequence[Item], fraction: float, seed: int, role: str) -> list[Item]:
    """The items one side of the split keeps (all of them without a split)."""
    if not fraction:
        return list(items)
    return [items[i] for i in held_out_indices(len(items), fraction, seed, role)]
