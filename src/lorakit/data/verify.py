"""Decoding every training image once at start-up, so a broken file stops the run before it starts.

Reading an image's header (its size) succeeds for a truncated JPEG; the decode fails only when a training step
reaches it, possibly hours in. So every image (and conditioning mask) is decoded fully before any model loads,
all bad files are reported together, and `--skip_bad_images` leaves them out with one warning instead.

Decoding a large dataset takes time, so it runs in a thread pool (PIL releases the GIL while it decodes) and
good verdicts are remembered by path, size and modification time in `<cache dir>/checked-images/`, one small
JSON file per folder: a second start decodes only new or changed files. The cache folder is
`$LORAKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/lorakit`, else `~/.cache/lorakit`; if it cannot be written the
check still runs, only without the memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lorakit.atomic import staged_file
from lorakit.data.images import decode_check
from lorakit.errors import DataError

logger = logging.getLogger(__name__)

MAX_THREADS = 8


def cache_dir() -> Path:
    explicit = os.environ.get("LORAKIT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lorakit"


def bad_images(paths: list[Path]) -> dict[Path, str]:
    """{path: reason} for every file that cannot be decoded; each good file's verdict is remembered."""
    by_folder: dict[Path, list[Path]] = {}
    for path in paths:
        by_folder.setdefault(path.parent, []).append(path)
    bad: dict[Path, str] = {}
    for folder, files in by_folder.items():
        known = _read_verdicts(folder)
        stamps = {path: _stamp(path) for path in files}
        unchecked = [p for p in files if stamps[p] is None or known.get(p.name) != stamps[p]]
        threads = max(1, min(MAX_THREADS, os.cpu_count() or 1, len(unchecked)))
        with ThreadPoolExecutor(threads) as pool:
            reasons = dict(zip(unchecked, pool.map(_reason, unchecked)))
        bad.update({p: r for p, r in reasons.items() if r})
        if unchecked:
            good = {p.name: stamps[p] for p in files if p not in bad and stamps[p] is not None}
            _write_verdicts(folder, good)
    return bad


def _reason(path: Path) -> str | None:
    try:
        decode_check(path)
    except DataError as err:
        return str(err)
    return None


def _stamp(path: Path) -> list[int] | None:
    """What identifies this version of a file: its size and modification time (ns)."""
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns]


def _verdict_file(folder: Path) -> Path:
    key = hashlib.sha1(str(folder.resolve()).encode("utf-8")).hexdigest()[:20]
    return cache_dir() / "checked-images" / f"{key}.json"


def _read_verdicts(folder: Path) -> dict[str, list[int]]:
    try:
        data = json.loads(_verdict_file(folder).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("folder") != str(folder.resolve()):
        return {}
    files = data.get("good")
    return files if isinstance(files, dict) else {}


def _write_verdicts(folder: Path, good: dict[str, list[int]]) -> None:
    target = _verdict_file(folder)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with staged_file(target) as tmp:
            tmp.write_text(json.dumps({"folder": str(folder.resolve()), "good": good}), encoding="utf-8")
    except OSError as err:  # only a cache: the next start decodes again
        logger.debug("cannot remember checked images in %s (%s)", target, err)


def bad_image_report(bad: dict[Path, str]) -> list[str]:
    """One line per bad file, sorted by path."""
    return [bad[path] for path in sorted(bad)]
