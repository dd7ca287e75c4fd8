"""Embedding tables (``nn.Embedding``, ``F.embedding``): weight-only quantization, one step per row.

    MACs = 0 (a lookup);  weight bytes = rows x dim x b_w / 8

The indices are integers and stay as they are (no input quantizer). In ONNX a
lookup is ``Gather(DequantizeLinear(codes [rows, dim], axis 0), indices)``.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import fx, nn

from cgmq_cli.errors import TraceError
from cgmq_cli.ops.base import (Call, ComputeOp, Read, arg, aten, call_function_for, claim_weight, is_param_attr,
                               layer_name, positional)


class Embedding(ComputeOp):
    name = "embedding"
    profile_kind = "embedding"
    integer = "embedding"
    modules = (nn.Embedding,)
    functions = (F.embedding, aten.embedding.default)
    onnx_ops = ("Gather",)

    def functionalize(self, gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> fx.Node:
        if module.max_norm is not None:
            raise TraceError(f"embedding `{node.target}` renormalises its rows (max_norm), which cgmq cannot quantize",
                             "drop max_norm, or keep its parent untraced with --leaf")
        return call_function_for(gm, node, F.embedding, lambda param: (node.args[0], param("weight"),
                                                                          module.padding_idx))

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Call | None:
        if node.op != "call_function" or node.target not in self.functions:
            return None
        if node.target is aten.embedding.default:  # aten.embedding(weight, indices)
            weight = arg(node, 0, "weight")
        else:
            weight = arg(node, 1, "weight")
            if is_param_attr(gm, weight):
                positional(node, ("input", "weight"))
        if not is_param_attr(gm, weight):
            return None
        return Call(node=node, kind=self, layer=layer_name(weight.target), op=self.name, weight=weight, inputs=(),
                    bias=None)

    def macs(self, call: Call) -> int:
        return 0

    # -- ONNX ------------------------------------------------------------------
    def export_weight(self, rw: Any, node: Any, mark: Any) -> bool:
        return claim_weight(rw, node, mark, "Gather", 0) is not None

    def read(self, g: Any, node: Any, batch: int) -> Read | None:
        """A Gather from a rank-2 table that is a float or dequantized constant (not shape arithmetic)."""
        origin = g.origin_const(node.input[0]) if node.op_type == "Gather" else None
        if origin is None or len(g.consts[origin].dims) != 2:
            return None
        if g.producer.get(node.input[0]) is None and g.consts[origin].data_type not in _FLOATS:
            return None
        return Read(act=None, weight=node.input[0], macs=0)


_FLOATS = (1, 10, 16, 11)  # onnx TensorProto FLOAT, FLOAT16, BFLOAT16, DOUBLE
