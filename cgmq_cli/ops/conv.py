"""Conv1d / Conv2d (grouped and depthwise included): one registry entry per dimensionality.

    MACs = output elements per example x Cin/groups x kernel size

Read back from ``Conv`` (QDQ files) and from the integer kernels of other
quantizers' files: ``QLinearConv`` (x, x_scale, x_zp, w, w_scale, w_zp,
y_scale, y_zp, B; onnxruntime's QOperator format) and ``ConvInteger`` (x, w,
x_zp, w_zp; its dynamic quantizer), whose operand widths are their integer
input types.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from cgmq_cli.errors import TraceError
from cgmq_cli.ops.base import (Call, ComputeOp, Read, arg, aten, call_function_for, claim_weight, integer_type,
                               is_param_attr, layer_name, onnx_input, per_example, positional, shape_of,
                               weight_shape)


class _Conv(ComputeOp):
    integer = "conv"
    onnx_ops = ("Conv", "QLinearConv", "ConvInteger")
    output_quantized = True
    functional_fn: Any = None

    def functionalize(self, gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> fx.Node:
        if getattr(module, "padding_mode", "zeros") != "zeros":
            raise TraceError(f"layer `{node.target}` uses padding_mode={module.padding_mode!r}, which cgmq cannot quantize",
                             "use zero padding, or keep its parent untraced with --leaf")
        return call_function_for(gm, node, self.functional_fn, lambda param: (
            node.args[0], param("weight"), param("bias") if module.bias is not None else None, module.stride,
            module.padding, module.dilation, module.groups))

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Call | None:
        if node.op != "call_function" or node.target not in self.functions:
            return None
        weight = arg(node, 1, "weight")
        if not is_param_attr(gm, weight):
            return None
        positional(node, ("input", "weight", "bias"))
        groups = arg(node, 6, "groups", 1)
        shape = shape_of(weight)
        op = self.name
        if self.name == "conv2d" and isinstance(groups, int) and groups > 1 and shape and shape[1] == 1:
            op = "depthwise"
        return Call(node=node, kind=self, layer=layer_name(weight.target), op=op, weight=weight,
                    inputs=(arg(node, 0, "input"),), bias=arg(node, 2, "bias"))

    def macs(self, call: Call) -> int:
        w = shape_of(call.weight)
        return per_example(shape_of(call.node)) * int(torch.Size(w[1:]).numel())

    # -- ONNX ------------------------------------------------------------------
    def export_weight(self, rw: Any, node: Any, mark: Any) -> bool:
        """Conv reads ``[Cout, Cin/g, k...]`` codes, per output channel (axis 0), and its float bias."""
        user = claim_weight(rw, node, mark, "Conv", 1)
        if user is None:
            return False
        if mark.bias is not None and (len(user.input) < 3 or not user.input[2]):
            del user.input[2:]  # torch.onnx dropped an all-zero bias: restore it
            user.input.append(rw.bias_init(mark))
        return True

    # operand positions per ONNX op: (input, weight, bias, input zero point, weight zero point)
    _operands = {"Conv": (0, 1, 2, None, None), "QLinearConv": (0, 3, 8, 2, 5), "ConvInteger": (0, 1, None, 2, 3)}

    def read(self, g: Any, node: Any, batch: int) -> Read | None:
        if node.op_type not in self._operands:
            return None
        x, w_at, b_at, x_zp, w_zp = self._operands[node.op_type]
        w = weight_shape(g, node.input[w_at])
        k = int(torch.Size(w[1:]).numel()) if w else None
        bias = onnx_input(node, b_at) if b_at is not None else g.bias_after(node)
        read = Read(act=node.input[x], weight=node.input[w_at], macs=g.macs(node, k, batch), bias=bias)
        if node.op_type == "Conv":
            return read
        return replace(read, act_type=integer_type(g, node, x, x_zp), weight_type=integer_type(g, node, w_at, w_zp))


class Conv1d(_Conv):
    name = "conv1d"
    profile_kind = "conv1d"
    modules = (nn.Conv1d,)
    functional_fn = F.conv1d
    functions = (F.conv1d, torch.conv1d, aten.conv1d.default)


class Conv2d(_Conv):
    name = "conv2d"
    profile_kind = "conv"
    modules = (nn.Conv2d,)
    functional_fn = F.conv2d
    functions = (F.conv2d, torch.conv2d, aten.conv2d.default)
