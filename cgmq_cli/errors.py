"""The one error hierarchy of cgmq.

Domain code raises a :class:`CgmqError` (or a kind of it); the CLI is the only
place that catches it, prints ``error: <message>`` plus an optional ``hint:``
line and exits with the kind's exit code. Tracebacks are shown only when the
environment variable ``CGMQ_DEBUG`` is set.

Exit codes (documented in the README):

====  ===========================================================
0     success
1     unexpected internal error (a bug: please report it)
2     bad input: files, flags, profiles, data, checkpoints
3     infeasible budget: below the minimum reachable cost
4     a check failed: over budget, parity or accuracy threshold
5     training failed (e.g. the loss stayed NaN)
130   interrupted (Ctrl-C / SIGTERM); the run can be resumed
====  ===========================================================
"""

from __future__ import annotations

import errno
import os

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_INFEASIBLE = 3
EXIT_CHECK_FAILED = 4
EXIT_TRAINING_FAILED = 5
EXIT_INTERRUPTED = 130


class CgmqError(Exception):
    """An error the user can act on: one line of message, an optional hint."""

    exit_code = EXIT_BAD_INPUT
    result: dict | None = None  # what the command found (check, verify): printed with the error under --json

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def with_result(self, result: dict) -> "CgmqError":
        """Attach the command's result, so that ``--json`` prints it together with the error."""
        self.result = result
        return self

    def __str__(self) -> str:
        return self.message


class UsageError(CgmqError):
    """Conflicting or invalid command-line flags or settings."""


class CheckpointError(CgmqError):
    """A model file that cannot be loaded (missing, corrupt, untrusted, wrong arch)."""


class TraceError(CgmqError):
    """A model that torch.fx cannot trace, or an unsupported construct."""


class ProfileError(CgmqError):
    """An invalid hardware profile (YAML) or a flag outside what it allows."""


class DataError(CgmqError):
    """A dataset spec that cannot be loaded or does not fit the model."""


class OutputError(CgmqError):
    """A file or directory cannot be written (disk full, read-only, permissions, name too long)."""


# What to do about the operating-system errors a user can meet; anything else keeps its errno text only.
OS_HINTS = {
    errno.ENOSPC: "free some disk space and run the command again",
    errno.EDQUOT: "free some space within your quota and run the command again",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.EACCES: "check the permissions of the path, or choose another location",
    errno.EPERM: "check the permissions of the path, or choose another location",
    errno.ENAMETOOLONG: "use a shorter file name (at most 255 bytes per path component)",
    errno.ENOTDIR: "a parent of the path is a file, not a directory",
    errno.EISDIR: "the path is a directory; name a file",
    errno.ENOENT: "check that the path exists",
    errno.EEXIST: "the path already exists",
    errno.EXDEV: "keep the file on the same file system as its directory",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
    errno.ENOMEM: "the machine ran out of memory",
    errno.EIO: "the disk reported an I/O error",
}


def os_error(exc: OSError, path: object = None, action: str = "write") -> OutputError:
    """One line for an OSError: ``cannot write PATH: No space left on device`` and what to do."""
    where = path if path is not None else (exc.filename if exc.filename is not None else None)
    from cgmq_cli.sanitize import clean, cut

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = exc.strerror or (os.strerror(exc.errno) if exc.errno else
                              f"{type(exc).__name__}: {cut(text, 200)}" if text else type(exc).__name__)

    subject = f" {clean(where)}" if where is not None else ""
    return OutputError(f"cannot {action}{subject}: {reason}", OS_HINTS.get(exc.errno or 0))


class InfeasibleBudgetError(CgmqError):
    """A budget below the minimum cost reachable under the profile."""

    exit_code = EXIT_INFEASIBLE


class ExportError(CgmqError):
    """The ONNX export could not be produced or failed its own checks."""


class CheckFailedError(CgmqError):
    """A verification or CI check did not hold (over budget, parity, accuracy)."""

    exit_code = EXIT_CHECK_FAILED


class ParityError(CheckFailedError):
    """onnxruntime and PyTorch disagree beyond the allowed threshold."""


class TrainingError(CgmqError):
    """Training could not continue (e.g. the loss stayed NaN)."""

    exit_code = EXIT_TRAINING_FAILED


class InterruptedRun(CgmqError):
    """The run was interrupted; its last checkpoint can be resumed."""

    exit_code = EXIT_INTERRUPTED


# A real SIGINT/SIGTERM reached this process (set by the CLI's handler; not a KeyboardInterrupt raised in code).
# The handler raises KeyboardInterrupt wherever Python is; inside a C extension's import or call that can come out
# as another error (e.g. ImportError "initialization failed"), which is then still an interrupt.
SIGNALLED = {"seen": False}


def is_interrupt(exc: BaseException) -> bool:
    """A KeyboardInterrupt, or any error raised after a real signal reached this process."""
    return isinstance(exc, KeyboardInterrupt) or (isinstance(exc, Exception) and SIGNALLED["seen"])
