"""Linear layers (``nn.Linear``, ``F.linear`` on a parameter weight).

    MACs = output elements per example x in_features

ONNX layout: a layer that runs as an integer kernel (8-bit weight and input on
a profile whose ``integer_ops`` has ``linear``) stays a ``Gemm`` (transB=1,
codes ``[out, in]`` per output channel, float bias as C), which onnxruntime
fuses into ``QGemm``. Every other width is written as ``MatMul`` with a
pre-transposed ``[in, out]`` weight (axis 1) plus ``Add`` for the bias:
onnxruntime 1.32 cannot load a 2-bit ``Gemm`` (its QGemm fusion rejects the
type), nor a 2-bit ``DequantizeLinear -> Transpose -> MatMul``.

Read back from ``Gemm`` / ``MatMul`` (QDQ files) and from the integer kernels
of other quantizers' files, whose operand widths are their integer input
types: ``QLinearMatMul`` and ``QGemm`` (onnxruntime's QOperator format),
``MatMulInteger``, ``MatMulIntegerToFloat`` and ``DynamicQuantizeMatMul``
(its dynamic quantizer; the last quantizes its float input to uint8 at run
time, so that input counts as 8 bits).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from onnx import TensorProto as TP
from onnx import helper
from torch import fx, nn

from cgmq_cli.ops.base import (Call, ComputeOp, Read, arg, aten, call_function_for, integer_type, is_param_attr,
                               layer_name, onnx_input, per_example, positional, shape_of, weight_shape)


def _attr(node: Any, name: str, default: Any = None) -> Any:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def plain_gemm(node: Any) -> bool:
    """``Gemm(A, B^T, C)`` with unit alpha and beta: an ordinary linear layer."""
    return (_attr(node, "transA", 0) == 0 and _attr(node, "transB", 0) == 1
            and float(_attr(node, "alpha", 1.0)) == 1.0 and float(_attr(node, "beta", 1.0)) == 1.0)


class Linear(ComputeOp):
    name = "linear"
    profile_kind = "linear"
    integer = "linear"
    modules = (nn.Linear,)
    functions = (F.linear, aten.linear.default)
    onnx_ops = ("Gemm", "MatMul", "QLinearMatMul", "QGemm", "MatMulInteger", "MatMulIntegerToFloat",
                "DynamicQuantizeMatMul")

    def functionalize(self, gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> fx.Node:
        return call_function_for(gm, node, F.linear, lambda param: (
            node.args[0], param("weight"), param("bias") if module.bias is not None else None))

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Call | None:
        if node.op != "call_function" or node.target not in self.functions:
            return None
        weight = arg(node, 1, "weight")
        if not is_param_attr(gm, weight):
            return None
        positional(node, ("input", "weight", "bias"))
        return Call(node=node, kind=self, layer=layer_name(weight.target), op=self.name, weight=weight,
                    inputs=(arg(node, 0, "input"),), bias=arg(node, 2, "bias"))

    def macs(self, call: Call) -> int:
        return per_example(shape_of(call.node)) * shape_of(call.weight)[1]

    # -- ONNX ------------------------------------------------------------------
    def export_weight(self, rw: Any, node: Any, mark: Any) -> bool:
        out = node.output[0]
        user = rw.sole_consumer(out, mark)
        if user.op_type == "Transpose" and list(_attr(user, "perm", [])) == [1, 0]:
            mms = rw.consumers[user.output[0]]
            if len(mms) == 1 and mms[0].op_type == "MatMul" and mms[0].input[1] == user.output[0]:
                mm = mms[0]
                rw.compute_node(mm, mark)
                rw.replace[id(node)] = []
                rw.replace[id(user)] = rw.weight_nodes(mark, user.output[0], transposed=True)
                if mark.bias is not None and not any(c.op_type == "Add" for c in rw.consumers[mm.output[0]]):
                    rw.replace[id(mm)] = rw.with_bias(mm, mark)
                return True
        if user.op_type == "Gemm" and user.input[1] == out and plain_gemm(user):
            if mark.integer:  # QGemm: the Gemm stays, weight [out, in] per output channel, int32 bias
                rw.compute_node(user, mark)
                nodes = rw.weight_nodes(mark, out, transposed=False)
                if mark.bias is not None:
                    nodes += rw.int32_bias(mark)
                    del user.input[2:]
                    user.input.append(nodes[-1].output[0])
                rw.replace[id(node)] = nodes
            else:
                rw.replace[id(node)] = rw.weight_nodes(mark, out, transposed=True)
                rw.replace[id(user)] = rw.gemm_as_matmul(user, mark)
            return True
        return False

    # integer kernels: (A, B, bias, A zero point, B zero point) positions
    _integer = {"QLinearMatMul": (0, 3, None, 2, 5), "QGemm": (0, 3, 6, 2, 5), "MatMulInteger": (0, 1, None, 2, 3),
                "MatMulIntegerToFloat": (0, 1, 6, 4, 5), "DynamicQuantizeMatMul": (0, 1, 4, None, 3)}

    def read(self, g: Any, node: Any, batch: int) -> Read | None:
        if node.op_type in self._integer:
            return self._read_integer(g, node, batch)
        if node.op_type == "Gemm":
            a = g.shapes.get(node.input[0])
            k = (a[0] if _attr(node, "transA", 0) else a[1]) if a and len(a) == 2 else None
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            return Read(act=node.input[0], weight=node.input[1], macs=g.macs(node, k, batch), bias=bias)
        if node.op_type != "MatMul":
            return None
        act, weight = node.input[0], node.input[1]
        if g.origin_const(weight) is None:
            if g.origin_const(act) is None:
                return None  # activation x activation: not a linear layer
            act, weight = weight, act  # constant on the left: it is the weight
        b = g.shapes.get(node.input[1])
        k = (b[-2] if len(b) >= 2 else b[0]) if b else None
        return Read(act=act, weight=weight, macs=g.macs(node, k, batch), bias=g.bias_add(node))

    def _read_integer(self, g: Any, node: Any, batch: int) -> Read | None:
        a_at, b_at, bias_at, a_zp, b_zp = self._integer[node.op_type]
        a, b = node.input[a_at], node.input[b_at]
        if g.origin_const(b) is None:
            return None  # activation x activation: not a linear layer
        shape = weight_shape(g, b)
        if node.op_type == "QGemm":
            k = (shape[1] if _attr(node, "transB", 0) else shape[0]) if shape and len(shape) == 2 else None
        else:
            k = (shape[-2] if len(shape) >= 2 else shape[0]) if shape else None
        macs = g.macs(node, k, batch)
        bias = onnx_input(node, bias_at) if bias_at is not None else g.bias_after(node)
        if node.op_type == "DynamicQuantizeMatMul":  # the float input is quantized to uint8 when it runs
            return Read(act=a, weight=b, macs=macs, bias=bias, act_type=TP.UINT8,
                        weight_type=integer_type(g, node, b_at, b_zp),
                        note="input quantized to uint8 at run time (dynamic quantization)")
        return Read(act=a, weight=b, macs=macs, bias=bias, act_type=integer_type(g, node, a_at, a_zp),
                    weight_type=integer_type(g, node, b_at, b_zp))
