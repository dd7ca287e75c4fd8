"""Tracing with ``torch.export`` when torch.fx cannot see a model's compute.

torch.fx traces symbolically, so Python control flow on shapes fails (e.g.
torchvision's Swin attention, which is ``torch.fx.wrap``-ped for that reason,
or Hugging Face models). ``torch.export`` (non-strict) specialises every shape
but the batch dimension and records aten operators, which the op registry
knows as well. The result is made a plain GraphModule: one tensor input per
positional argument, one tensor output (``logits`` when the model returns a
ModelOutput-like structure, else the first tensor), ``train()``/``eval()``
toggling only the mode flag.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch
from torch import fx, nn


def export_module(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """``torch.export`` ``model`` on ``example`` (batch dimension dynamic, from 1 up) as a plain GraphModule."""
    batch = torch.export.Dim("batch", min=1)
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export", "torch._dynamo")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},), strict=False)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return plain_module(program.module())


def plain_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop the pytree calling convention of an exported module: flat inputs, one tensor output."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    flat = output.args[0]
    if isinstance(flat, (list, tuple)):
        index = _logits_index(info.out_spec if info is not None else None)
        tensors = [x for x in flat if isinstance(x, fx.Node)]
        chosen = flat[index] if index is not None and index < len(flat) else (tensors[0] if tensors else None)
        output.args = (chosen,)
    gm.graph._codegen = fx.graph.CodeGen()
    gm.recompile()
    for name in ("train", "eval"):  # exported modules make these raise; the graph's ops are fixed either way
        gm.__dict__.pop(name, None)
    return gm


def _logits_index(spec) -> int | None:
    """The flat position of a ``logits`` field in an output spec (a dataclass / dict output), or None."""
    if spec is None:
        return None
    leaves = 0

    def walk(node, path: tuple) -> int | None:
        nonlocal leaves
        if node.is_leaf():
            if "logits" in path:
                return leaves
            leaves += 1
            return None
        children = node.children() if hasattr(node, "children") else node.children_specs
        keys = node.context if isinstance(node.context, (list, tuple)) else [None] * len(children)
        if isinstance(node.context, list) and len(node.context) == 2 and isinstance(node.context[1], list):
            keys = node.context[1]  # dataclass-like contexts: (type, field names)
        for key, child in zip(list(keys) + [None] * len(children), children):
            found = walk(child, path + (str(key),))
            if found is not None:
                return found
        return None

    return walk(spec, ())
