"""Matrix products: ``torch.matmul`` / ``@`` / ``bmm`` between two activations, or with a parameter.

    MACs = output elements per example x K      (K: the contracted dimension)

Between two activations (attention's ``q @ k^T`` and ``p @ v``) both operands
get an input quantizer with its own gate, and the layer's BOPs are
``MACs x b_left x b_right``; it stores no weight. With a parameter as the right
operand (``x @ W``, W of shape [K, N]) it is a linear layer without transpose:
a weight quantizer per output column (axis -1).

The layer of an activation product is named after the module it runs in and
its order there: ``<module>.matmul``, ``<module>.matmul_1``, ... (attention
written out by :mod:`cgmq_cli.graph.attention`: ``scores`` and ``context``).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from cgmq_cli.ops.base import Call, ComputeOp, Read, aten, claim_weight, is_param_attr, layer_name, per_example, shape_of

_NAMED = "cgmq_name"  # node.meta key: a layer name given by a rewrite (e.g. the attention decomposition)


class MatMul(ComputeOp):
    name = "matmul"
    profile_kind = "matmul"
    integer = "matmul"
    functions = (torch.matmul, operator.matmul, torch.bmm, aten.matmul.default, aten.bmm.default)
    methods = ("matmul", "bmm", "__matmul__")
    onnx_ops = ("MatMul",)
    weight_axis = -1

    def functionalize(self, gm: fx.GraphModule, node: fx.Node, module: Any) -> fx.Node:  # pragma: no cover
        raise NotImplementedError("matmul has no module form")

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Call | None:
        if not ((node.op == "call_function" and node.target in self.functions)
                or (node.op == "call_method" and node.target in self.methods)):
            return None
        if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
            return None
        left, right = node.args
        if shape_of(left) is None or shape_of(right) is None or shape_of(node) is None:
            return None
        if is_param_attr(gm, left):
            return None  # W @ x: not a layout cgmq quantizes (left float and counted as such)
        if is_param_attr(gm, right):
            if len(shape_of(right)) != 2:
                return None
            return Call(node=node, kind=self, layer=layer_name(right.target), op="linear", weight=right, inputs=(left,))
        return Call(node=node, kind=self, layer=activation_layer_name(node), op=self.name, weight=None,
                    inputs=(left, right))

    def macs(self, call: Call) -> int:
        right = shape_of(call.weight if call.weight is not None else call.inputs[1])
        k = right[-2] if len(right) >= 2 else right[0]
        return per_example(shape_of(call.node)) * int(k)

    # -- ONNX ------------------------------------------------------------------
    def export_weight(self, rw: Any, node: Any, mark: Any) -> bool:
        """``x @ W``: MatMul reads the ``[K, N]`` codes per output column (axis 1) directly."""
        return claim_weight(rw, node, mark, "MatMul", 1) is not None

    def read(self, g: Any, node: Any, batch: int) -> Read | None:
        """Activation x activation MatMul (a MatMul with a constant operand is a linear layer)."""
        if node.op_type != "MatMul" or g.origin_const(node.input[0]) or g.origin_const(node.input[1]):
            return None
        b = g.shapes.get(node.input[1])
        k = (b[-2] if len(b) >= 2 else b[0]) if b else None
        return Read(act=node.input[0], weight=node.input[1], macs=g.macs(node, k, batch), weight_is_activation=True)


def activation_layer_name(node: fx.Node) -> str:
    """``<innermost module path>.<name>``: a given name, else ``matmul``, ``matmul_1``, ... in graph order."""
    if _NAMED in node.meta:
        return node.meta[_NAMED]
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    siblings = [n for n in node.graph.nodes if n.op in ("call_function", "call_method")
                and _NAMED not in n.meta and ((n.meta.get("nn_module_stack") or {}) and
                                              next(reversed(n.meta["nn_module_stack"].values()))[0] == path
                                              or not path and not n.meta.get("nn_module_stack"))
                and _is_product(n)]
    index = siblings.index(node)
    base = "matmul" if index == 0 else f"matmul_{index}"
    return f"{path}.{base}" if path else base


def _is_product(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in MatMul.functions) or \
        (node.op == "call_method" and node.target in MatMul.methods)
