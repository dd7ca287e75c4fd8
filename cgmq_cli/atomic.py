"""Atomic file writes: a temporary ``.cgmq-<pid>-<random>.tmp`` in the same directory (short, so any
legal file name works), fsynced, given normal permissions and renamed over the target; temporaries of
dead processes are removed by :func:`clean_stale`. An OSError becomes one OutputError line naming the
file, and the previous file, if any, is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

from cgmq_cli import safe_load
from cgmq_cli.errors import os_error

TMP_PREFIX, TMP_SUFFIX = ".cgmq-", ".tmp"
_TMP_NAME = re.compile(r"\.cgmq-(\d+)-[A-Za-z0-9_]+\.tmp")


def _mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def temp_file(directory: Path) -> tuple[int, Path]:
    """A new temporary file in ``directory`` named ``.cgmq-<pid>-<random>.tmp`` with normal permissions."""
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=TMP_SUFFIX, dir=directory)
    try:
        os.fchmod(fd, _mode())  # mkstemp makes 0600; the finished file gets what the umask allows, like any other
    except OSError:
        pass
    return fd, Path(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def clean_stale(directory: Path) -> list[Path]:
    """Remove temporaries left in ``directory`` by cgmq processes that no longer run (SIGKILL, power loss)."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        found = _TMP_NAME.fullmatch(entry.name)
        if found and not _alive(int(found.group(1))) and entry.is_file() and not entry.is_symlink():
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the same directory, fsync, then rename over ``path``.

    An OSError (disk full, read-only file system, ...) becomes one OutputError
    line naming ``path``; the previous file, if any, is left as it was.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file(path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        raise os_error(exc, path) from None
    except RuntimeError as exc:  # torch.save reports a full disk as "enforce fail at inline_container.cc"
        if "inline_container" in str(exc) or "write" in str(exc).lower():
            raise os_error(OSError(errno.EIO, _torch_write_reason(str(exc))), path) from None
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _torch_write_reason(text: str) -> str:
    if "No space" in text or "errno 28" in text.lower():
        return os.strerror(errno.ENOSPC)
    return "the file could not be written completely (disk full or I/O error?)"


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def save_torch(path: Path, obj: Any) -> None:
    import torch

    atomic_write(path, lambda p: torch.save(obj, p))


def read_json(path: Path) -> Any:
    return safe_load.read_json(Path(path))
