"""Where a run's files go, checked before the work: writable folders, names that can be written, no links.

`destination_problems` finds at start-up what would otherwise fail only at the first save, after hours of
training: an `--output_dir` that is a file or cannot be written, an `--output_name` whose subfolder is missing,
a `--logging_dir` that cannot be written, a final file or state name that is a symbolic link. Writability is
tested for real: a probe file is created, written and removed in the nearest existing folder (permission bits
say nothing for root, for network file systems or for read-only mounts).

`clean_stale_temporaries` removes what a killed run of the same output name left behind (staging folders
and temporary files of saves); the caller holds the output name's lock (`lorakit.training.locks`), so no live
run is writing them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("lorakit")

MODEL_EXTENSIONS = ("safetensors", "ckpt", "pt")
# `.<target>.<random>.tmp` (staging files and folders, lorakit.atomic) and `.<target>.<random>.old` (a state
# renamed aside while its replacement moves in); `<target>.tmp` is the staging folder of earlier versions
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.(?:tmp|old)|(?P<legacy>.+)\.tmp")


def output_folder(cfg: Any) -> Path:
    """The folder the run's files are written to: --output_dir, plus a subfolder given in --output_name."""
    base = Path(cfg.output_dir)
    return (base / cfg.output_name).parent if cfg.output_name else base


def output_stem_pattern(output_name: str | None) -> re.Pattern[str]:
    """File and state names of one output name (sd-scripts' names, inventory §8.1) as a regular expression."""
    if output_name:
        stem = re.escape(Path(output_name).name) + r"(?:-\d{6}|-step\d{8})?"
    else:
        stem = r"(?:epoch-\d{6}|at-step\d{8}|last)"
    return re.compile(stem + r"(?:-state|\.(?:" + "|".join(MODEL_EXTENSIONS) + r"))")


def destination_problems(cfg: Any) -> list[str]:
    """Every problem with the places a run writes to, as one-line messages naming the option."""
    if not cfg.output_dir:
        return []
    problems = folder_problems("--output_dir", Path(cfg.output_dir))
    if not problems and cfg.output_name and Path(cfg.output_name).parent != Path("."):
        sub = output_folder(cfg)
        if Path(cfg.output_dir).is_dir() and not sub.is_dir():
            problems.append(f"--output_name {cfg.output_name}: the folder {sub} does not exist; create it or "
                            "give a name without a folder")
    if not problems:
        problems += _link_problems(cfg)
        sample = Path(cfg.output_dir) / "sample"
        if cfg.sample_prompts and sample.exists() and not sample.is_dir():
            problems.append(f"--sample_prompts: sample images go to {sample}, which is a file")
    if getattr(cfg, "logging_dir", None):
        problems += folder_problems("--logging_dir", Path(cfg.logging_dir))
    return problems


def folder_problems(option: str, folder: Path) -> list[str]:
    """A folder that is (or can be made) a folder lorakit can write in, or the reason it is not."""
    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            return [f"{option} {folder}: {existing} is a symbolic link to {os.readlink(existing)}, which does not exist"]
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing == folder and not folder.is_dir():
        return [f"{option} {folder}: is a file, not a folder"]
    if not existing.is_dir():
        return [f"{option} {folder}: cannot be made, {existing} is a file, not a folder"]
    reason = write_probe_failure(existing)
    if reason:
        where = "" if existing == folder else f" (it would be made inside {existing})"
        return [f"{option} {folder}: cannot write there{where}: {reason}"]
    return []


def write_probe_failure(folder: Path) -> str | None:
    """Create, write and remove a small file in `folder`; the OS's reason when that fails, else None."""
    try:
        fd, name = tempfile.mkstemp(prefix=".lorakit-write-check-", dir=folder)
        try:
            os.write(fd, b"lorakit")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _link_problems(cfg: Any) -> list[str]:
    """Names this run would replace that are symbolic links (a dangling one included)."""
    folder = output_folder(cfg)
    if not folder.is_dir():
        return []
    pattern = output_stem_pattern(cfg.output_name)
    return [f"--output_name: {entry} is a symbolic link; lorakit does not replace or write through links "
            "(remove it or choose another --output_name)"
            for entry in sorted(folder.iterdir()) if entry.is_symlink() and pattern.fullmatch(entry.name)]


def clean_stale_temporaries(cfg: Any) -> list[Path]:
    """Remove the staging files and folders a killed run of this output name left; returns what was removed.

    A state renamed aside (`.old`) whose replacement never arrived is put back under its name instead.
    """
    folder = output_folder(cfg)
    if not folder.is_dir():
        return []
    pattern = output_stem_pattern(cfg.output_name)
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _TEMPORARY.fullmatch(entry.name)
        target = match and (match.group("target") or match.group("legacy"))
        if not target or not pattern.fullmatch(target) or entry.is_symlink():
            continue
        final = folder / target
        try:
            if entry.name.endswith(".old") and not final.exists() and not final.is_symlink():
                os.replace(entry, final)
                log.warning("%s: put back the state a killed run had renamed aside (%s)", final, entry.name)
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
        except OSError as exc:  # only tidying: the run can go on
            log.warning("cannot remove %s, left by an interrupted run (%s)", entry, exc.strerror or exc)
            continue
        removed.append(entry)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted run in %s", len(removed), folder)
    return removed
