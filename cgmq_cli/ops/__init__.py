"""The op registry: every op kind cgmq quantizes, counts or places quantizers around.

Compute ops (MACs; a weight or a second activation times an activation) and
tensor ops (no MACs; integer targets run them on quantized tensors) each have
one entry (see :mod:`cgmq_cli.ops.base` for what an entry holds). Graph
passes, the cost model's MACs, the ONNX export layout and ``cgmq verify``'s
read-back all look ops up here.
"""

from __future__ import annotations

from torch import fx, nn

from cgmq_cli.ops.base import Call, ComputeOp, Read, TensorOp
from cgmq_cli.ops.conv import Conv1d, Conv2d
from cgmq_cli.ops.embedding import Embedding
from cgmq_cli.ops.linear import Linear
from cgmq_cli.ops.matmul import MatMul
from cgmq_cli.ops.tensor_ops import TENSOR_OPS, fused_activation, is_passthrough

# Order matters for read-back: a MatMul with a constant operand is a linear layer before it is a product.
COMPUTE_OPS: tuple[ComputeOp, ...] = (Conv1d(), Conv2d(), Linear(), MatMul(), Embedding())
# What a profile's ``integer_ops`` may list: the op kinds a target runs as integer kernels.
INTEGER_OPS: tuple[str, ...] = tuple(dict.fromkeys([op.integer for op in COMPUTE_OPS] + [op.integer for op in TENSOR_OPS]))
ONNX_COMPUTE_TYPES: tuple[str, ...] = tuple(dict.fromkeys(t for op in COMPUTE_OPS for t in op.onnx_ops))

__all__ = ["Call", "ComputeOp", "Read", "TensorOp", "COMPUTE_OPS", "TENSOR_OPS", "INTEGER_OPS", "ONNX_COMPUTE_TYPES",
           "module_op", "match", "tensor_op", "is_passthrough", "fused_activation", "read"]


def module_op(module: nn.Module) -> ComputeOp | None:
    """The compute op of a module (exact type: a subclass may change ``forward``)."""
    return next((op for op in COMPUTE_OPS if type(module) in op.modules), None)


def match(gm: fx.GraphModule, node: fx.Node) -> Call | None:
    """The quantizable call at ``node`` (a functional call on a parameter weight), or None."""
    for op in COMPUTE_OPS:
        call = op.match(gm, node)
        if call is not None:
            return call
    return None


def tensor_op(node: fx.Node, modules: dict[str, nn.Module]) -> TensorOp | None:
    return next((op for op in TENSOR_OPS if op.matches(node, modules)), None)


def read(graph, node, batch: int) -> tuple[ComputeOp, Read] | None:
    """The compute op and read-back of an ONNX node of any QDQ file, or None when it is not one."""
    for op in COMPUTE_OPS:
        if node.op_type in op.onnx_ops:
            found = op.read(graph, node, batch)
            if found is not None:
                return op, found
    return None
