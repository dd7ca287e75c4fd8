"""Shared helpers of the end-to-end tests: driving the CLI and checking its one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner

from cgmq_cli.cli import app

ARCH = "cgmq_cli.models:DigitsCNN"
FAST = ["--data", "digits", "--epochs", "1", "--subset", "256", "--gate-steps", "5", "--batch-size", "64"]
# No 8-bit x 8-bit layer: onnxruntime's integer kernels saturate on some CPUs (a known, separate issue), and these
# runs are exported in tests whose subject is not parity.
NO_INT8 = ["--weight-bits", "2,4,16,32", "--act-bits", "4,16,32"]
runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int, *needles: str) -> str:
    """Exit ``code``; stderr ends with exactly one ``error:`` line (+ optional ``hint:``); no traceback, no raw ESC."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1, lines
    tail = lines[errors[0]:]
    assert len(tail) <= 2 and (len(tail) == 1 or tail[1].startswith("hint: ")), lines
    assert "Traceback" not in result.output and "\x1b" not in result.output, result.output
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    return lines[errors[0]]


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every file and link under ``root`` (outside ``skip``) with its size and mtime: to prove nothing else changed."""
    out = {}
    skip_resolved = tuple(p.resolve() for p in skip)
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if (here / d).resolve() not in skip_resolved]
        for name in files + [d for d in dirs if (here / d).is_symlink()]:
            path = here / name
            if path.resolve() in skip_resolved:
                continue
            info = path.lstat()
            out[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns)
    return out
