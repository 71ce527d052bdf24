"""One run per output name: a lock file beside the outputs, holding the PID and host of the run that owns it.

Two runs writing the same `--output_dir`/`--output_name` would replace each other's files and states, so a
run takes `<output folder>/.<name>.lock` before it loads a model and the second one stops with a message
naming the first. The lock is an OS file lock (`flock`), which the kernel releases when its process dies, so
the lock file of a killed run on this host is taken over (with a message); one written by another host is
respected, because its run may be alive (remove the file when it is not). Where `flock` is missing (Windows),
the lock is the file's existence and a lock of a dead process on this host is taken over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.training.destination import output_folder

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("lorakit")


def lock_path(cfg: Any) -> Path:
    """`.<output name>.lock` in the folder the run writes to (`last` when no --output_name, as the final file)."""
    name = Path(cfg.output_name).name if cfg.output_name else "last"
    return output_folder(cfg) / f".{name}.lock"


class OutputLock:
    """Held from start-up to the end of a run (a context manager); `release` removes the lock file."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None
        self.made_folder = False  # removed again at release when the run wrote nothing into it

    def __enter__(self) -> "OutputLock":
        if self.fd is None:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ taking

    def acquire(self) -> None:
        self.made_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            self._acquire_by_existence()
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                raise ConfigError([self._in_use_message(holder)]) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the file was removed by its releasing owner between our open and our lock
        previous = _read_holder(fd)
        if previous and previous.get("host") != socket.gethostname():
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise ConfigError([self._in_use_message(previous)])
        if previous and previous.get("pid") != os.getpid():
            log.warning("%s: taking over the lock of PID %s (started %s), which is no longer running",
                        self.path, previous.get("pid"), previous.get("started", "?"))
        _write_holder(fd)
        self.fd = fd

    def _acquire_by_existence(self) -> None:
        """Without flock: create the file exclusively; a lock of a dead process on this host is replaced."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with open(self.path, "rb") as handle:
                holder = _parse(handle.read())
            if not holder or holder.get("host") != socket.gethostname() or _alive(int(holder.get("pid", 0))):
                raise ConfigError([self._in_use_message(holder)]) from None
            log.warning("%s: taking over the lock of PID %s, which is no longer running", self.path, holder.get("pid"))
            self.path.unlink()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        _write_holder(fd)
        self.fd = fd

    def _in_use_message(self, holder: dict[str, Any] | None) -> str:
        who = (f"PID {holder.get('pid')} on {holder.get('host')}, started {holder.get('started', '?')}"
               if holder else "another run")
        return (f"--output_dir/--output_name: {self.path.parent} is in use by {who} (lock file {self.path}); two "
                "runs with one output name would replace each other's files. Choose another --output_name or "
                "--output_dir, or wait for that run to end (delete the lock file only if no such run exists)")

    # ------------------------------------------------------------------ giving back

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if _same_file(self.fd, self.path):
                self.path.unlink()  # while still locked, so nobody takes a file that is about to vanish
        except OSError:
            pass
        finally:
            os.close(self.fd)  # releases the flock
            self.fd = None
        if self.made_folder:
            try:
                self.path.parent.rmdir()  # only succeeds when empty: a run that failed before its first file
            except OSError:
                pass


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except OSError:
        return False


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        holder = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _read_holder(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    return _parse(os.read(fd, 4096))


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(info).encode("utf-8"))
    os.fsync(fd)


class _NoLock:
    def __enter__(self) -> "_NoLock":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def hold_output(cfg: Any, is_main_process: bool = True) -> OutputLock | _NoLock:
    """The lock of this run's output name, taken now, with a killed run's temporaries cleaned up under it.

    Only the main process writes files, so only it locks (the other processes of a multi-GPU run share its
    output name by design).
    """
    if not is_main_process:
        return _NoLock()
    from lorakit.training.destination import clean_stale_temporaries

    lock = OutputLock(lock_path(cfg))
    lock.acquire()
    try:
        clean_stale_temporaries(cfg)
    except BaseException:
        lock.release()
        raise
    return lock
