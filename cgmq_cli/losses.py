"""The losses a run calls: the task loss (``--loss`` or cross-entropy) and what weight training minimises.

Both are wrapped so that an exception in them (user code, or labels outside the model's classes)
is one DataError line, not a traceback.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from cgmq_cli import checkpoint
from cgmq_cli.errors import CgmqError, DataError, UsageError
from cgmq_cli.sanitize import cut


class GuardedLoss:
    """The loss as called by training: an exception (or sys.exit) in it is one DataError line, not a traceback."""

    def __init__(self, fn: Callable, spec: str | None) -> None:
        self.fn, self.spec = fn, spec

    def __call__(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        try:
            value = self.fn(out, target)
        except CgmqError:
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code (and bad labels) may raise anything
            raise loss_error(exc, self.spec, out) from None
        what = _named(self.spec)
        if not isinstance(value, torch.Tensor) or value.ndim != 0 or not value.is_floating_point():
            got = (f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                   else f"a {type(value).__name__}")
            raise DataError(f"{what} returned {got}, not one float number as a 0-dim tensor",
                            "return e.g. F.cross_entropy(out, y) (reduction 'mean' or 'sum')")
        if out.requires_grad and not value.requires_grad:
            raise DataError(f"{what} returned a tensor detached from the model's output, so nothing can train",
                            "compute it from `out` without .detach(), .item() or torch.tensor(...)")
        return value


def _named(spec: str | None) -> str:
    return f"--loss {cut(spec, 80)}" if spec else "the loss (cross-entropy)"


def loss_error(exc: BaseException, spec: str | None, out: torch.Tensor) -> DataError:
    what = _named(spec)
    if isinstance(exc, SystemExit):
        return DataError(f"{what} called sys.exit({cut(exc.code, 40)})", "a loss function must return a tensor")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    hint = "fix the loss function" if spec else None
    if "out of bounds" in first or "Target" in first or isinstance(exc, IndexError):
        classes = out.shape[1] if out.ndim == 2 else None
        hint = (f"the labels must be class indices from 0 to {classes - 1} (the model has {classes} outputs); "
                "check --data" if classes else "check the labels of --data")
    return DataError(f"{what} raised {type(exc).__name__}" + (f": {cut(first, 160)}" if first else ""), hint)


def task_loss(spec: str | None) -> Callable:
    """``--loss module:fn`` (imported; user code), or cross-entropy."""
    if spec is None:
        return GuardedLoss(nn.functional.cross_entropy, None)
    fn = checkpoint.import_object(spec, "--loss")
    if not callable(fn):
        raise UsageError(f"--loss {cut(spec)} is not callable")
    return GuardedLoss(fn, spec)


def training_loss(spec: str | None, label_smoothing: float, task: Callable) -> Callable:
    """What weight training minimises: ``task``, or with ``label_smoothing`` the built-in cross-entropy with
    smoothed targets (a ``--loss`` is taken as it is)."""
    if spec is not None or label_smoothing <= 0:
        return task
    return GuardedLoss(functools.partial(nn.functional.cross_entropy, label_smoothing=label_smoothing), None)
