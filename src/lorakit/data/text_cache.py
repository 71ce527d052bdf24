"""`--cache_text_encoder_outputs(_to_disk)`: the outputs of frozen text encoders, computed once per caption.

Captions cannot change between steps when caching is on (the option rules and `text_cache_problems` refuse
shuffling, dropout, tag dropout, warm-up and wildcards with it), so a caption's outputs are the same every time it
comes back. In memory the cache keeps one row per caption, encoded the first time a batch needs it. On disk
(`--cache_text_encoder_outputs_to_disk`) every image has its family's npz file (`data/text_files.py`): the run
checks them before any model loads, encodes only the captions whose files are missing or stale, and then reads
each batch's rows from the files; when none is missing (and nothing else needs them) the text encoders are not
loaded at all. A family calls `outputs(captions, encode)` with a function that runs its frozen encoders on a list
of captions and returns batched tensors by name (sd-scripts' file keys); an encoder that is being trained runs
every step outside the cache (sd-scripts' "partial" caching for the CLIPs of FLUX and SD3).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorakit.data.text_files import TextFileFormat, TextFileRequest, is_valid, read_text_file, text_file_path, text_request, write_text_file
from lorakit.errors import ConfigError, DataError

if TYPE_CHECKING:
    from lorakit.data.dataset import TrainDataset

logger = logging.getLogger(__name__)
Encode = Callable[[list[str]], dict[str, torch.Tensor]]


def caches_text(cfg: Any) -> bool:
    """Whether the run asked for cached text-encoder outputs (`_to_disk` implies caching)."""
    return bool(getattr(cfg, "cache_text_encoder_outputs", False) or getattr(cfg, "cache_text_encoder_outputs_to_disk", False))


@dataclass(frozen=True)
class PendingFile:
    """An image's cache file to (re)write before training: its caption and what the file must say."""

    caption: str
    path: Path
    request: TextFileRequest


@dataclass
class CaptionCache:
    """Per-caption rows of named text-encoder outputs: in memory, or read from the family's npz files."""

    fmt: TextFileFormat | None = None  # set when the outputs live in files
    files: dict[str, Path] = field(default_factory=dict)  # caption -> a valid file holding its outputs
    pending: list[PendingFile] = field(default_factory=list)  # files to write before training
    needs_encoders: bool = True  # False: every caption is in `files` and nothing else runs the encoders
    device: torch.device | None = None  # where rows read from files go (the training device)
    ragged_mask: str | None = None  # the format's mask of real tokens, for encoders of varying lengths
    _rows: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._rows) + len(self.files)

    def outputs(self, captions: list[str], encode: Encode) -> dict[str, torch.Tensor]:
        """The batched outputs for `captions`: from memory or the files, encoding (without gradients) only
        captions seen for the first time."""
        missing = sorted({c for c in captions if c not in self._rows and c not in self.files})
        if missing:
            if not self.needs_encoders:
                raise DataError(f"no text-encoder cache file holds the caption {missing[0]!r} and the text encoders "
                                "were not loaded; run again to encode it")
            with torch.no_grad():
                fresh = encode(missing)
            for index, caption in enumerate(missing):
                self._rows[caption] = caption_row(fresh, index, self.ragged_mask)
        rows = [self._rows[c] if c in self._rows else self._read(c) for c in captions]
        # a file holds every output; a row encoded here may hold fewer (a trained encoder's stay out of memory)
        names = [name for name in rows[0] if all(name in row for row in rows)]
        return {name: stack_rows([row[name] for row in rows]) for name in names}

    def _read(self, caption: str) -> dict[str, torch.Tensor]:
        try:
            row = read_text_file(self.files[caption], self.fmt)
        except OSError as error:
            raise DataError(str(error)) from None
        return row if self.device is None else {name: value.to(self.device) for name, value in row.items()}

    def describe(self) -> str:
        """The plan's line: where the outputs come from and whether the text encoders load."""
        if self.fmt is None:
            return "  text encoders     loaded; their outputs are cached in memory (each caption encoded once)"
        if not self.needs_encoders:
            return (f"  text encoders     not loaded: every caption's outputs are cached in *{self.fmt.suffix} files "
                    f"({len(self.files)} captions)")
        todo = f"{len(self.pending)} *{self.fmt.suffix} files to write" if self.pending else f"all *{self.fmt.suffix} files valid"
        return f"  text encoders     loaded ({todo})"

    def write_pending(self, encode: Encode, batch_size: int = 1, progress: bool = False,
                      rank: int = 0, world: int = 1) -> int:
        """Encode and write this process's share (every `world`-th) of the pending files; the number written."""
        from tqdm.auto import tqdm

        share = self.pending[rank::max(1, world)]
        captions = sorted({item.caption for item in share})
        by_caption: dict[str, list[PendingFile]] = {}
        for item in share:
            by_caption.setdefault(item.caption, []).append(item)
        bar = tqdm(total=len(share), desc="caching text-encoder outputs", unit="file", disable=not progress)
        for start in range(0, len(captions), max(1, batch_size)):
            chunk = captions[start:start + max(1, batch_size)]
            with torch.no_grad():
                outputs = encode(chunk)
            for index, caption in enumerate(chunk):
                row = caption_row(outputs, index, self.ragged_mask)
                for item in by_caption[caption]:
                    write_text_file(item.path, item.request, row)
                bar.update(len(by_caption[caption]))
        bar.close()
        return len(share)

    def adopt_pending(self) -> None:
        """Every pending file has been written (by this process or another): read them from now on."""
        for item in self.pending:
            self.files.setdefault(item.caption, item.path)
        self.pending = []


def caption_row(outputs: dict[str, torch.Tensor], index: int, ragged_mask: str | None) -> dict[str, torch.Tensor]:
    """One caption's outputs from a batch; with a mask of real tokens, the outputs of that length lose their
    padding (a caption's tokens do not depend on the captions it was batched with)."""
    row = {name: value[index] for name, value in outputs.items()}
    if ragged_mask is None:
        return row
    keep = row[ragged_mask].bool()
    return {name: value[keep] if value.dim() and value.shape[0] == keep.shape[0] else value for name, value in row.items()}


def stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """A batch of rows; rows of different lengths are zero-padded to the longest (a mask pads with False)."""
    longest = max(row.shape[0] if row.dim() else 0 for row in rows)
    if all(row.dim() == 0 or row.shape[0] == longest for row in rows):
        return torch.stack(rows)
    return torch.stack([torch.cat([row, row.new_zeros(longest - row.shape[0], *row.shape[1:])]) for row in rows])


def run_text_cache(cfg: Any, given: CaptionCache | None, fmt: TextFileFormat | None = None) -> CaptionCache | None:
    """The cache a family's `load` uses: the run's (`given`), else an in-memory one when `cfg` asks for caching
    (callers that load a family outside a run; `fmt` tells rows of varying length apart)."""
    if given is not None:
        return given
    return CaptionCache(ragged_mask=fmt.ragged_mask if fmt else None) if caches_text(cfg) else None


def text_cache_problems(cfg: Any, dataset: TrainDataset) -> list[str]:
    """Subsets whose captions change per step (set in a dataset file, which the option rules do not see)."""
    if caches_text(cfg) and dataset.captions_vary():
        return ["--cache_text_encoder_outputs: a dataset subset changes its captions per step (shuffle, dropout, tag "
                "dropout, token warm-up or wildcards); remove one or the other"]
    return []


def plan_text_cache(cfg: Any, dataset: TrainDataset, fmt: TextFileFormat, encoders_wanted: bool = False,
                    to_disk: bool = False) -> CaptionCache | None:
    """The run's text cache (None without caching), its files checked before any model loads.

    `encoders_wanted`: something besides caching runs the text encoders (sample prompts, an encoder that
    trains), so they load even when every file is valid. `to_disk`: files whatever the options say (`lorakit
    cache`).
    """
    if not caches_text(cfg):
        return None
    if not (to_disk or getattr(cfg, "cache_text_encoder_outputs_to_disk", False)):
        return CaptionCache(ragged_mask=fmt.ragged_mask)
    skip_check = bool(getattr(cfg, "skip_cache_check", False))
    files: dict[str, Path] = {}
    pending: list[PendingFile] = []
    for path, caption in _image_captions(dataset, fmt).items():
        request = text_request(cfg, fmt, caption)
        if is_valid(path, request, fmt, skip_check):
            files.setdefault(caption, path)
        else:
            pending.append(PendingFile(caption, path, request))
    if files and pending:
        logger.info("text-encoder cache: %d files valid, %d to write", len(files), len(pending))
    return CaptionCache(fmt, files, pending, needs_encoders=bool(pending) or encoders_wanted, ragged_mask=fmt.ragged_mask)


def _image_captions(dataset: TrainDataset, fmt: TextFileFormat) -> dict[Path, str]:
    """Each image's cache file and the caption it holds; an image given two captions (in two subsets) cannot
    share one file."""
    captions: dict[Path, str] = {}
    clashes: list[str] = []
    for image_id, entry in enumerate(dataset.images):
        path, caption = text_file_path(entry.path, fmt), dataset.fixed_caption(image_id)
        if captions.setdefault(path, caption) != caption:
            clashes.append(f"{entry.path}: captions {captions[path]!r} and {caption!r}")
    if clashes:
        raise ConfigError([f"--cache_text_encoder_outputs_to_disk keeps one caption per image, but {clash} (the image "
                           "is in two subsets); cache in memory or give it one caption" for clash in clashes])
    return captions
