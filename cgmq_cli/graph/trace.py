"""torch.fx tracing with user leaf modules and readable errors.

A model that fx cannot trace (data-dependent control flow, iterating over a
tensor, ...) gives a one-line :class:`TraceError` that names the submodule
being traced when it failed and the construct, and suggests ``--leaf``.
"""

from __future__ import annotations

import copy
import difflib
from typing import Iterable

import torch
from torch import fx, nn

from cgmq_cli.errors import TraceError

_CONSTRUCTS = (
    ("cannot be used as inputs to control flow", "data-dependent control flow (an `if`/`while` on a tensor value)"),
    ("cannot be iterated", "iteration over a tensor (a `for` loop or unpacking)"),
    ("len(", "len() of a tensor"),
    ("object is not subscriptable", "subscripting a traced value"),
    ("index", "indexing with a traced value"),
)


class CgmqTracer(fx.Tracer):
    """fx.Tracer that keeps user-named submodules whole and remembers where it is."""

    def __init__(self, leaves: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaves = set(leaves)
        self.cgmq_stack: list[str] = []
        self.cgmq_failed_in: str | None = None  # innermost submodule whose forward raised

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):  # noqa: ANN001 - fx signature
        qualname = self.path_of_module(m)
        self.cgmq_stack.append(qualname)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # Remember where it failed now: the stack is unwound by the time trace() sees the error.
            if self.cgmq_failed_in is None:
                self.cgmq_failed_in = qualname
            raise
        finally:
            self.cgmq_stack.pop()


def _describe(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for needle, construct in _CONSTRUCTS:
        if needle in str(exc):
            return construct
    return f"{type(exc).__name__}: {text}"


def check_leaves(model: nn.Module, leaves: Iterable[str]) -> None:
    """Every ``--leaf`` must name an existing submodule."""
    names = [n for n, _ in model.named_modules() if n]
    for leaf in leaves:
        if leaf not in names:
            close = difflib.get_close_matches(leaf, names, n=1)
            hint = f"did you mean `{close[0]}`?" if close else "run `cgmq inspect` to see the module names"
            raise TraceError(f"--leaf {leaf}: the model has no submodule of that name", hint)


def trace(model: nn.Module, leaves: Iterable[str] = ()) -> fx.GraphModule:
    """Symbolically trace ``model`` into a GraphModule (an existing GraphModule is copied)."""
    leaves = list(leaves)
    if isinstance(model, fx.GraphModule) and not leaves:
        return copy.deepcopy(model)
    check_leaves(model, leaves)
    tracer = CgmqTracer(leaves)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; all mean "not traceable"
        failed_in = tracer.cgmq_failed_in
        where = failed_in if failed_in else "<top-level model>"
        raise TraceError(
            f"cannot trace module `{where}` ({type(model).__name__}): {_describe(exc)}",
            f"keep that submodule untraced with `--leaf {where}`"
            if failed_in
            else "rewrite the construct without tensor-dependent Python control flow",
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def example_forward(gm: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """Run once in eval mode without gradients (shape checks, calibration)."""
    with torch.no_grad():
        return gm(example)
