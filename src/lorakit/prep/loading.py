"""Loading images in batches, in this process or in DataLoader workers (`--max_data_loader_n_workers`).

An image that cannot be read is named in a warning and left out of its batch; it never stops the run. Workers
return the failure as text instead of raising, so the warning is logged by the main process in file order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

from tqdm import tqdm

from lorakit.prep.files import warn_skipped

T = TypeVar("T")


@dataclass(frozen=True)
class Loaded(Generic[T]):
    """One image after `prepare`: its path and the prepared value, or the reason it could not be read."""

    path: Path
    value: T | None
    error: str | None = None


def load_one(path: Path, prepare: Callable[[Path], T]) -> Loaded[T]:
    try:
        return Loaded(path, prepare(path))
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported and skipped, never fatal
        return Loaded(path, None, f"cannot read the image ({err.__class__.__name__}: {err})")


class _BatchDataset:
    """A torch-style dataset whose items are whole batches of prepared images (a list per batch)."""

    def __init__(self, batches: list[list[Path]], prepare: Callable[[Path], Any]):
        self.batches = batches
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[Loaded]:
        return [load_one(path, self.prepare) for path in self.batches[index]]


def _unwrap(items: list) -> list:
    return items[0]


def iterate_batches(paths: list[Path], batch_size: int, prepare: Callable[[Path], T], workers: int | None = None,
                    description: str = "images") -> Iterator[list[tuple[Path, T]]]:
    """(path, prepared value) batches of up to `batch_size` readable images, with a progress bar over batches.

    `prepare` must be picklable (a module-level function or a functools.partial of one) when `workers` > 0.
    """
    groups = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    if workers:
        import torch.utils.data

        source = torch.utils.data.DataLoader(_BatchDataset(groups, prepare), batch_size=1, shuffle=False,
                                             num_workers=workers, collate_fn=_unwrap)
    else:
        source = (_BatchDataset(groups, prepare)[i] for i in range(len(groups)))
    for batch in tqdm(source, total=len(groups), desc=description, unit="batch", smoothing=0.0):
        good = []
        for item in batch:
            if item.error is not None:
                warn_skipped(item.path, item.error)
            else:
                good.append((item.path, item.value))
        if good:
            yield good
