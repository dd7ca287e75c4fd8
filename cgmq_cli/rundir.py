"""Run directories: markers, locks, cleanup and the ``latest`` pointer (files are written by :mod:`cgmq_cli.atomic`,
read and checked by :mod:`cgmq_cli.run_files`).

    runs/<name>/
      .cgmq-run        marker: {"format": "cgmq-run/1", "id", "path", "uid", ...}, written first
      .cgmq-lock       fcntl lock, held by the one process that writes the run
      config.json      resolved settings (how to rebuild the model and resume)
      profile.yaml     the hardware profile used (a copy, so the run does not depend on the user's file)
      checkpoint.pt    training state after the last finished epoch (resume)
      model.pt         the compressed model: state, bits, ranges (written at the end)
      report.json      cost recomputed from the final integer widths, accuracy, layers
      train.log        one line per event
    runs/latest -> <name>

Rules (the README's "Trust model and --force rules"):

* ``--force`` replaces only a directory with a valid marker, never the working
  directory or one of its parents, a symbolic link, or a directory holding an
  input of the new run; and only after every flag was validated.
* One writer at a time: compress and export hold an exclusive ``flock`` on
  ``.cgmq-lock``; a second writer gets a one-line error.
* Every file is written through a temporary ``.cgmq-<pid>-<random>.tmp`` in the
  same directory (short, so any legal file name works), fsynced, given normal
  permissions and renamed; temporaries of dead processes are removed.
* ``latest`` is replaced only when cgmq made it (a symbolic link to a sibling
  name, or a ``latest.txt`` naming one), and followed only to a marked sibling.
* A run directory whose marker names another path (moved, copied) or that
  belongs to another user is untrusted: code its config names is imported only
  with ``--trust-checkpoint`` (see :func:`untrusted_reason`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cgmq_cli import __version__
from cgmq_cli.atomic import _mode, clean_stale, save_torch, temp_file, write_json, write_text
from cgmq_cli.errors import UsageError, os_error
from cgmq_cli.sanitize import short

LATEST = "latest"
LATEST_TXT = "latest.txt"
MARKER = ".cgmq-run"
LOCK = ".cgmq-lock"
FORMAT = "cgmq-run/1"
HELD = ".cgmq-replaced"  # the run a --force replacement set aside until the new one finishes
RUN_FILES = ("config.json", "profile.yaml", "checkpoint.pt", "model.pt", "report.json", "train.log", MARKER, LOCK, HELD)


# ----------------------------------------------------------------------------- markers ---


def read_marker(path: Path) -> dict | None:
    """The marker of run directory ``path`` (a regular file with cgmq's format id), or None."""
    marker = Path(path) / MARKER
    try:
        info = marker.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > 4096:
            return None
        data = json.loads(marker.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("id"), str):
        return None
    return data


def is_run_dir(path: Path) -> bool:
    return Path(path).is_dir() and read_marker(path) is not None


def _owner_differs(path: Path) -> bool:
    getuid = getattr(os, "getuid", None)
    try:
        return getuid is not None and path.stat().st_uid != getuid()
    except OSError:
        return False


def untrusted_reason(run_dir: Path) -> str | None:
    """Why ``run_dir`` cannot vouch for the code its config.json names, or None when it can.

    A run directory is the user's own when its marker records this very path
    and the directory, its marker and config.json belong to the current user and
    config.json is not writable by others. A moved or copied directory, or one
    from another user, may have been edited by someone else.
    """
    run_dir = Path(run_dir)
    marker = read_marker(run_dir)
    if marker is None:
        return "has no cgmq marker (made by an older cgmq, or by hand)"
    if marker.get("path") != str(run_dir.resolve()):
        return f"was moved or copied (it was made as {short(marker.get('path'), 80)})"
    config = run_dir / "config.json"
    for path in (run_dir, run_dir / MARKER, config):
        if _owner_differs(path):
            return f"belongs to another user ({path.name} is not yours)"
    with contextlib.suppress(OSError):
        if config.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return "has a config.json that other users can write"
    return None


# ------------------------------------------------------------------------------- locks ---


class RunLock:
    """An exclusive ``flock`` on ``<run>/.cgmq-lock``; released on close or when the process dies."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def acquire(self, record: bool = True) -> "RunLock":
        """Take the lock (or fail with one line naming the holder); ``record`` writes this pid into the file."""
        try:
            import fcntl
        except ImportError:  # no flock on this platform: runs are not locked (README, Limitations)
            return self

        path = self.run_dir / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), _mode())
        except OSError as exc:
            raise os_error(exc, self.run_dir, "lock the run directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fd, 32, 0).decode().strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UsageError(f"{self.run_dir} is in use by another cgmq process"
                                 + (f" (pid {holder})" if holder.isdigit() else ""),
                                 "wait until it finishes, or choose another --out") from None
            raise os_error(exc, self.run_dir, "lock the run directory") from None
        if record:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[RunLock]:
    lock = RunLock(run_dir).acquire()
    try:
        yield lock
    finally:
        lock.release()


# -------------------------------------------------------------------- new run directories ---


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def check_new_run(path: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Every check ``prepare`` makes, without writing anything (run first, before any real work)."""
    path = Path(path)
    if path.is_symlink():
        raise UsageError(f"--out {path} is a symbolic link; cgmq writes a run only into a real directory",
                         "pass the directory itself, or another --out")
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UsageError(f"--out {path} is the working directory or one of its parents; cgmq never writes a run there",
                         "choose a new directory, e.g. --out runs/NAME")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} exists and is not a directory", "choose another --out")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise UsageError(f"run directory {path} already exists", "choose another --out, or pass --force to replace it")
        if not is_run_dir(path):
            raise UsageError(f"{path} is not a cgmq run directory (no valid {MARKER} marker); "
                             "refusing to replace it even with --force", "choose another --out")
        for item in inputs:
            if _inside(item, path):
                raise UsageError(f"{path} holds {item}, an input of this run; refusing to replace it even with --force",
                                 "move the input out of the run directory, or choose another --out")
        RunLock(path).acquire(record=False).release()  # in use by another process: say so now, before any work
    _check_writable(path)


def _check_writable(path: Path) -> None:
    """The nearest existing ancestor is a directory we may create entries in."""
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # a dangling link on the way
            raise UsageError(f"cannot write to run directory {path}: {probe} is a dangling symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot write to run directory {path}: {probe} is a file, not a directory",
                         "choose a writable --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(probe) else "permission denied"
        raise UsageError(f"cannot write to run directory {path}: {reason}", "choose a writable --out")


def _read_only(path: Path) -> bool:
    with contextlib.suppress(OSError, AttributeError):
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    return False


@dataclass
class RunDir:
    """A run directory this process writes: its lock, and what it created (for :meth:`discard`)."""

    path: Path
    lock: RunLock
    id: str
    created: list[Path] = field(default_factory=list)  # directories made for it, deepest first

    @property
    def replacing(self) -> bool:
        """Whether the run this one replaces (--force) is still set aside in :data:`HELD`."""
        return (self.path / HELD).is_dir()

    def release(self) -> None:
        self.lock.release()

    def finished(self) -> None:
        """The new run is complete: the run it replaced is removed for good."""
        with contextlib.suppress(OSError):
            shutil.rmtree(self.path / HELD)

    def discard(self) -> None:
        """Undo a run that failed before it trained anything: no empty shell is left behind, and a run it was
        replacing (--force) is put back as it was."""
        with contextlib.suppress(OSError):
            if self.created and self.created[0] == self.path:
                shutil.rmtree(self.path)
            elif self.replacing:
                _empty(self.path, keep=(LOCK, HELD))
                for entry in (self.path / HELD).iterdir():
                    entry.rename(self.path / entry.name)
                (self.path / HELD).rmdir()
            else:
                _empty(self.path)
        for folder in self.created[1:]:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        self.release()


def _empty(path: Path, keep: tuple[str, ...] = ()) -> None:
    for entry in path.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _set_aside(path: Path) -> None:
    """--force: move the run in ``path`` into :data:`HELD`, where it stays until the new run finishes.

    A finished run there replaces whatever was held before. An unfinished one
    is moved only when nothing is held: otherwise it is the remains of an
    earlier replacement that never finished, and the run held for that one is
    still the one to keep.
    """
    held = path / HELD
    if held.is_dir() and not is_finished(path):
        _empty(path, keep=(LOCK, HELD))
        return
    if held.exists():
        shutil.rmtree(held)
    held.mkdir()
    for entry in path.iterdir():
        if entry.name not in (LOCK, HELD):
            entry.rename(held / entry.name)


def prepare(path: Path, force: bool, inputs: tuple[Path, ...] = ()) -> RunDir:
    """Create (or, with ``force``, replace) run directory ``path``: marker written, lock held.

    Checks again what :func:`check_new_run` checked; a replaced run is locked
    before its files are removed, so a process still writing it is never
    disturbed.
    """
    path = Path(path)
    check_new_run(path, force, inputs)
    created: list[Path] = []
    probe = path
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write to run directory {path}: {exc.strerror}", "choose a writable --out") from None
    lock = RunLock(path)
    try:
        lock.acquire()
        if force and read_marker(path) is not None:
            _set_aside(path)
        run_id = uuid.uuid4().hex
        write_json(path / MARKER, {"format": FORMAT, "id": run_id, "path": str(path.resolve()),
                                   "uid": os.getuid() if hasattr(os, "getuid") else None,
                                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cgmq_version": __version__})
    except BaseException:
        lock.release()
        for folder in created:
            with contextlib.suppress(OSError):
                shutil.rmtree(folder) if folder == path else folder.rmdir()
        raise
    return RunDir(path, lock, run_id, created)


def open_run(path: Path) -> RunDir:
    """Lock an existing run directory for writing (resume, export); clean its stale temporaries."""
    path = Path(path)
    lock = RunLock(path).acquire()
    clean_stale(path)
    marker = read_marker(path) or {}
    return RunDir(path, lock, str(marker.get("id", "")))


def is_finished(path: Path) -> bool:
    return (Path(path) / "report.json").is_file() and (Path(path) / "model.pt").is_file()


def run_id(path: Path) -> str | None:
    marker = read_marker(path)
    return marker["id"] if marker else None


# ------------------------------------------------------------------ the demo's model folder ---

DEMO_MARKER = ".cgmq-demo"


def check_demo_dir(path: Path, force: bool) -> None:
    """``cgmq demo --out D`` also writes ``D-float/``: never over a folder cgmq did not make, and only with --force."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UsageError(f"{path} exists and is not a directory", "choose another --out for the demo")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise UsageError(f"{path} already exists (the demo's float model)",
                             "pass --force to replace the demo's files, or choose another --out")
        if not (path / DEMO_MARKER).is_file():
            raise UsageError(f"{path} was not made by `cgmq demo` (no {DEMO_MARKER}); refusing to replace it even "
                             "with --force", "choose another --out for the demo")
    _check_writable(path)


def write_demo_model(folder: Path, name: str, state: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / DEMO_MARKER, {"format": "cgmq-demo/1"})
    save_torch(folder / name, state)


# --------------------------------------------------------------------------- the pointer ---


def _plain_name(text: str) -> bool:
    return bool(text) and text not in (".", "..") and "/" not in text and os.sep not in text and "\0" not in text \
        and (os.altsep is None or os.altsep not in text)


def _latest_is_ours(parent: Path) -> bool:
    """Whether ``parent/latest`` is absent or a pointer cgmq made (a link to a plain sibling name)."""
    link = parent / LATEST
    if link.is_symlink():
        target = os.readlink(link)
        return _plain_name(target) and (is_run_dir(parent / target) or not (parent / target).exists())
    return not link.exists()


def _latest_txt_is_ours(parent: Path) -> bool:
    txt = parent / LATEST_TXT
    if txt.is_symlink():
        return False
    if not txt.exists():
        return True
    try:
        lines = txt.read_text()[:4096].splitlines() if txt.is_file() and txt.stat().st_size < 4096 else None
    except (OSError, UnicodeDecodeError):
        return False
    return bool(lines) and len(lines) == 1 and _plain_name(lines[0]) and (
        is_run_dir(parent / lines[0]) or not (parent / lines[0]).exists())


def point_latest(run: Path) -> str | None:
    """Point ``<parent>/latest`` at ``run``; returns a note when an existing ``latest`` is not cgmq's."""
    parent = run.parent
    link = parent / LATEST
    if not _latest_is_ours(parent):
        return f"left {link} alone: it is not a pointer cgmq made"
    fd, tmp = temp_file(parent)
    os.close(fd)
    tmp.unlink()
    try:
        tmp.symlink_to(run.name, target_is_directory=True)
        os.replace(tmp, link)
        return None
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
    if not _latest_txt_is_ours(parent):
        return f"left {parent / LATEST_TXT} alone: it is not a pointer cgmq made"
    write_text(parent / LATEST_TXT, run.name + "\n")
    return None


def resolve_run(run: str | None, default_root: Path = Path("runs")) -> Path:
    """A run directory given by the user, or the one ``runs/latest`` points to (checked, never followed blindly)."""
    if run is None:
        return _resolve_latest(default_root)
    path = Path(run)
    if not path.is_dir():
        raise UsageError(f"{path} is not a cgmq run directory" + (" (it does not exist)" if not path.exists() else ""),
                         "pass the directory that `cgmq compress` wrote")
    if read_marker(path) is None and not (path / "config.json").is_file():
        raise UsageError(f"{path} is not a cgmq run directory (no {MARKER} marker)",
                         "pass the directory that `cgmq compress` wrote")
    return path


def _resolve_latest(root: Path) -> Path:
    link, txt = root / LATEST, root / LATEST_TXT
    if link.is_symlink():
        target = os.readlink(link)
        if not _plain_name(target) or not is_run_dir(root / target):
            raise UsageError(f"{link} points to {short(target)}, which is not a cgmq run directory beside it",
                             "pass a run directory")
        return root / target
    if link.exists():
        raise UsageError(f"{link} is not a pointer cgmq made (a {'directory' if link.is_dir() else 'regular file'})",
                         "pass a run directory")
    if txt.exists():
        if not _latest_txt_is_ours(root) or not txt.is_file():
            raise UsageError(f"{txt} does not name a cgmq run directory beside it", "pass a run directory")
        name = txt.read_text().strip()
        if not is_run_dir(root / name):
            raise UsageError(f"{txt} names {short(name)}, which is not a cgmq run directory", "pass a run directory")
        return root / name
    raise UsageError(f"no run given and {link} does not exist", "pass a run directory, or run `cgmq compress` first")


def code_note(specs: list[str]) -> str:
    return "importing code named in the run's config.json: " + ", ".join(specs)


def ensure_writable_dir(path: Path) -> None:
    """Refuse early when ``path`` (a directory that must take new files) is not writable."""
    if not os.access(path, os.W_OK | os.X_OK):
        err = errno.EROFS if _read_only(path) else errno.EACCES
        raise os_error(OSError(err, os.strerror(err)), path)


class RunLog:
    """Appends one line per event to train.log (flushed, so a killed run keeps its log)."""

    def __init__(self, path: Path) -> None:
        try:
            self.fh = open(path, "a", buffering=1)
        except OSError as exc:
            raise os_error(exc, path) from None
        self.path = path

    def write(self, line: str) -> None:
        from cgmq_cli.sanitize import clean

        try:
            self.fh.write(clean(line.rstrip("\n")) + "\n")
        except OSError as exc:
            raise os_error(exc, self.path) from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()
