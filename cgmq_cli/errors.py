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

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

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
