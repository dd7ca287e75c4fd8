"""Run directories: atomic writes, never overwritten without --force, a ``latest`` pointer.

    runs/<name>/
      config.json      resolved settings (how to rebuild the model and resume)
      profile.yaml     the hardware profile used (a copy, so the run does not depend on the user's file)
      checkpoint.pt    training state after the last finished epoch (resume)
      model.pt         the compressed model: state, bits, ranges (written at the end)
      report.json      cost recomputed from the final integer widths, accuracy, layers
      train.log        one line per event
    runs/latest -> <name>
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from cgmq_cli.errors import UsageError

LATEST = "latest"
MARKER = "config.json"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the same directory, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
    try:
        write(Path(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def save_torch(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: torch.save(obj, p))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} is missing", "is this a cgmq run directory? see `cgmq compress --help`") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def prepare_run_dir(path: Path, force: bool) -> None:
    """Create ``path`` for a new run; refuse an existing non-empty one unless ``force``.

    Checks writability here, before any training starts. With ``force`` only a
    previous cgmq run directory is replaced, never an arbitrary folder.
    """
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise UsageError(f"run directory {path} already exists", "choose another --out, or pass --force to replace it")
        if not (path / MARKER).exists():
            raise UsageError(f"{path} is not a cgmq run directory; refusing to replace it even with --force")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write to run directory {path}: {exc.strerror}", "choose a writable --out") from None


def point_latest(run: Path) -> None:
    """Make ``<parent>/latest`` point at ``run`` (symlink swapped atomically)."""
    link = run.parent / LATEST
    tmp = run.parent / f".{LATEST}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(run.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)
        write_text(run.parent / f"{LATEST}.txt", run.name + "\n")


def resolve_run(run: str | None, default_root: Path = Path("runs")) -> Path:
    """A run directory given by the user, or ``runs/latest``."""
    if run is None:
        link = default_root / LATEST
        if link.exists():
            return link.resolve()
        txt = default_root / f"{LATEST}.txt"
        if txt.exists():
            return default_root / txt.read_text().strip()
        raise UsageError(f"no run given and {link} does not exist", "pass a run directory, or run `cgmq compress` first")
    path = Path(run)
    if not (path / MARKER).is_file():
        raise UsageError(f"{path} is not a cgmq run directory (no {MARKER})", "pass the directory that `cgmq compress` wrote")
    return path


class RunLog:
    """Appends one line per event to train.log (flushed, so a killed run keeps its log)."""

    def __init__(self, path: Path) -> None:
        self.fh = open(path, "a", buffering=1)

    def write(self, line: str) -> None:
        self.fh.write(line.rstrip("\n") + "\n")

    def close(self) -> None:
        self.fh.close()
