"""Ops without MACs that matter for quantizer placement.

* :class:`Add`, :class:`Concat`, :class:`AvgPool`: integer targets run them on
  quantized tensors (onnxruntime: QLinearAdd, QLinearConcat,
  QLinearAveragePool / QLinearGlobalAveragePool), so on such a profile their
  inputs and output are quantized.
* passthrough ops keep values on the grid of their input (max-pooling, layout
  ops, dropout at inference); onnxruntime runs them on the quantized type when
  a Q/DQ pair with *the same* parameters surrounds them, so their output
  shares the input's quantizer (an alias in the exported file).
* fusable activations (ReLU, ReLU6, hardtanh/clamp from 0): onnxruntime drops
  them between an integer op and a QuantizeLinear with zero point 0, so an
  integer op's output is quantized after them. Their upper bound (6 for ReLU6)
  caps the step, so that the quantizer's range stays inside the clip.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from cgmq_cli.ops.base import TensorOp, _targets, aten, shape_of


class Add(TensorOp):
    name = "add"
    integer = "add"
    functions = (operator.add, operator.iadd, torch.add, aten.add.Tensor)
    methods = ("add", "add_")
    onnx_ops = ("Add",)

    def matches(self, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
        return super().matches(node, modules) and len(self.tensor_inputs(node)) == 2 \
            and all(shape_of(x) == shape_of(node) for x in self.tensor_inputs(node))


class Concat(TensorOp):
    name = "concat"
    integer = "concat"
    functions = (torch.cat, torch.concat, aten.cat.default)
    onnx_ops = ("Concat",)


class AvgPool(TensorOp):
    name = "avgpool"
    integer = "pooling"
    modules = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
    functions = (F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                 aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default)
    onnx_ops = ("AveragePool", "GlobalAveragePool")


TENSOR_OPS: tuple[TensorOp, ...] = (Add(), Concat(), AvgPool())

_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Unflatten,
                 nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_PASS_FUNCTIONS = (F.max_pool1d, F.max_pool2d, torch.flatten, torch.reshape, torch.transpose, torch.permute,
                   torch.squeeze, torch.unsqueeze, F.dropout, aten.view.default, aten.reshape.default,
                   aten.flatten.using_ints, aten.permute.default, aten.transpose.int, aten.squeeze.dim,
                   aten.unsqueeze.default, aten.max_pool2d.default, aten.dropout.default, aten.clone.default,
                   aten.t.default)
_PASS_METHODS = ("view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous", "t")


def is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An op whose output values are values of its (first) input: the input's grid carries over."""
    if node.op == "call_function" and node.target is operator.getitem:
        return shape_of(node.args[0]) is not None and shape_of(node) is not None
    if node.op == "call_module" and isinstance(modules.get(node.target), (nn.MaxPool1d, nn.MaxPool2d)):
        return not modules[node.target].return_indices
    return _targets(node, modules, _PASS_MODULES, _PASS_FUNCTIONS, _PASS_METHODS) and shape_of(node) is not None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def fused_activation(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[bool, float | None]:
    """(whether ``node`` is a ReLU-like clip from 0 that a runtime fuses into a Q, its upper bound)."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, nn.ReLU6):
            return True, 6.0
        if isinstance(m, nn.ReLU):
            return True, None
        if isinstance(m, nn.Hardtanh) and m.min_val == 0:
            return True, float(m.max_val)
        return False, None
    target = node.target
    if node.op == "call_function" and target in (F.relu, torch.relu, aten.relu.default):
        return True, None
    if node.op == "call_method" and target == "relu":
        return True, None
    if node.op == "call_function" and target is F.relu6:
        return True, 6.0
    if node.op == "call_function" and target in (F.hardtanh, aten.hardtanh.default):
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        return (_number(low) == 0.0), _number(high)
    if (node.op == "call_function" and target in (torch.clamp, torch.clip, aten.clamp.default)) or \
            (node.op == "call_method" and target in ("clamp", "clip")):
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
        return (_number(low) == 0.0), _number(high)
    return False, None
