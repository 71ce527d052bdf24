"""Keeping the trained weights when a save fails (a full disk, a removed or read-only output folder).

The destination is checked at start-up (`lorakit.training.destination`), but a disk can fill up or a folder
vanish during a run of hours. Then the LoRA file is written to a fresh folder in the system's temporary
directory instead, and the error names both places, so the work is not lost with the failed save.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

from lorakit.errors import CheckpointError

log = logging.getLogger("lorakit")


def save_or_rescue(save: Callable[[Path], None], path: Path) -> None:
    """`save(path)` (a trained file's writer), or on failure the same file in a new temporary folder and a
    `CheckpointError` naming the failed path, the reason and where the weights are now."""
    try:
        save(path)
        return
    except CheckpointError as failure:
        reason = str(failure)
    try:
        rescue = Path(tempfile.mkdtemp(prefix="lorakit-rescue-")) / Path(path).name
        save(rescue)
    except (CheckpointError, OSError) as second:
        raise CheckpointError(f"{reason}; writing the trained weights to the temporary folder failed too "
                              f"({second}); free some space and train again") from None
    log.error("%s; the trained weights were written to %s instead", reason, rescue)
    raise CheckpointError(f"{reason}; the trained weights were written to {rescue} instead (move that file to "
                          "its place once the output folder can be written)") from None
