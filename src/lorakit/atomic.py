"""Writing a file or folder under its final name only once it is complete.

Every output (LoRA files, checkpoints, training states, latent caches) is written to a temporary name in the
target's folder and renamed over the target, so an interrupted run never leaves a partial file. `mkstemp` and
`mkdtemp` create their entries private to the owner (0600/0700); the finished output gets the permissions a plain
`open()` or `mkdir()` would have given it (0666/0777 minus the umask), so that another user or a service on the
same machine (a ComfyUI or Forge server, a shared output folder) can read a trained LoRA as it reads any file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["default_permissions", "replace_folder", "staged_file", "staged_folder"]


def default_permissions(folder: bool = False) -> int:
    """What `open()` (0666) or `mkdir()` (0777) would create under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


@contextlib.contextmanager
def staged_file(target: str | os.PathLike[str], *, prefix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `target` (an empty file already exists there); on success it is renamed
    over `target`, on any error it is removed."""
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=prefix or f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, default_permissions())  # after the write: some writers replace the file they are given
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`, named uniquely for this process; on success it replaces
    `target` (see `replace_folder`), on any error it is removed."""
    import shutil

    target = Path(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(staging, default_permissions(folder=True))
        yield staging
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_folder(staging: Path, target: Path) -> None:
    """Put the complete folder `staging` in place of `target` with renames only.

    An existing `target` is first renamed aside (to a unique `.<name>.<random>.old`), so at every instant either
    the old or the new folder is complete under some name; a crash between the two renames leaves the old one
    aside, where `lorakit.training.destination` puts it back on the next start. A symbolic link at `target` is
    refused (OSError): replacing it would drop the link, writing through it would put files elsewhere.
    """
    import shutil

    if target.is_symlink():
        raise OSError(f"{target} is a symbolic link; lorakit does not replace or write through links")
    aside = None
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, aside)  # onto the empty folder just made: atomic, and the name is this process's own
    os.replace(staging, target)
    fsync_folder(target.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def fsync_folder(folder: Path) -> None:
    """Make the renames in `folder` durable where the platform allows it (not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
