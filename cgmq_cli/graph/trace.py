"""torch.fx tracing with user leaf modules and readable errors.

A model that fx cannot trace (data-dependent control flow, iterating over a
tensor, ...) gives a one-line :class:`TraceError` that names the submodule
being traced when it failed and the construct, and suggests ``--leaf``.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
from typing import Iterable, Iterator

import torch
import torch.fx._symbolic_trace as fx_trace
from torch import fx, nn

from cgmq_cli.errors import TraceError
from cgmq_cli.graph import attention

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


@contextlib.contextmanager
def _inlining_wrapped_functions() -> Iterator[None]:
    """Trace *through* functions registered with ``torch.fx.wrap`` (e.g. torchvision's Swin attention),
    so that their linear layers and products are seen; restored afterwards."""
    saved = dict(fx_trace._wrapped_fns_to_patch)
    fx_trace._wrapped_fns_to_patch.clear()
    try:
        yield
    finally:
        fx_trace._wrapped_fns_to_patch.update(saved)


def trace(model: nn.Module, leaves: Iterable[str] = (), example: torch.Tensor | None = None) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule whose compute cgmq can see (an existing GraphModule is copied).

    ``nn.MultiheadAttention`` modules are written out first (see
    :mod:`cgmq_cli.graph.attention`; on a copy, the user's model is not
    changed). Then torch.fx traces, *through* functions wrapped with
    ``torch.fx.wrap`` when that works; when it does not, or fx fails, and an
    ``example`` input is given, ``torch.export`` traces instead
    (:mod:`cgmq_cli.graph.export_trace`); when both fail, the fx error names
    the submodule. ``F.scaled_dot_product_attention`` becomes its two matmuls.
    """
    leaves = list(leaves)
    if isinstance(model, fx.GraphModule) and not leaves:
        gm = copy.deepcopy(model)
        if hasattr(gm.graph._codegen, "pytree_info"):  # a torch.export program's module (a .pt2)
            from cgmq_cli.graph.export_trace import plain_module

            gm = plain_module(gm)
        attention.decompose_sdpa(gm)
        return gm
    check_leaves(model, leaves)
    if any(type(m) is nn.MultiheadAttention for m in model.modules()):
        model = copy.deepcopy(model)
        attention.replace_multihead_attention(model, set(leaves))
    wrapped = {name for _, name in fx_trace._wrapped_fns_to_patch}
    gm = None
    try:
        with _inlining_wrapped_functions():
            gm = fx.GraphModule(model, CgmqTracer(leaves).trace(model), type(model).__name__)
    except Exception:  # a wrapped function cannot be traced through
        pass
    if gm is None:
        tracer = CgmqTracer(leaves)
        try:
            gm = fx.GraphModule(model, tracer.trace(model), type(model).__name__)
        except Exception as exc:  # fx raises many types; all mean "not traceable"
            exported = _exported(model, example, leaves)
            if exported is None:
                raise _trace_error(tracer, model, exc) from exc
            gm = exported
        else:
            if any(n.op == "call_function" and getattr(n.target, "__name__", "") in wrapped for n in gm.graph.nodes):
                gm = _exported(model, example, leaves) or gm  # the wrapped calls hide compute: export sees it
    attention.decompose_sdpa(gm)
    return gm


def _exported(model: nn.Module, example: torch.Tensor | None, leaves: list[str]) -> fx.GraphModule | None:
    """torch.export's graph of ``model``, or None (no example, --leaf given, or export fails)."""
    if example is None or leaves:
        return None
    from cgmq_cli.graph.export_trace import export_module

    try:
        return export_module(model, example)
    except Exception:  # torch.export raises many types; the fx error is the one to show
        return None


def _trace_error(tracer: CgmqTracer, model: nn.Module, exc: Exception) -> TraceError:
    failed_in = tracer.cgmq_failed_in
    where = failed_in if failed_in else "<top-level model>"
    return TraceError(
        f"cannot trace module `{where}` ({type(model).__name__}): {_describe(exc)}",
        f"keep that submodule untraced with `--leaf {where}`"
        if failed_in
        else "rewrite the construct without tensor-dependent Python control flow",
    )


def example_forward(gm: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """Run once in eval mode without gradients (shape checks, calibration)."""
    with torch.no_grad():
        return gm(example)
