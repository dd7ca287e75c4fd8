"""What every op kind of the registry provides, and the small records it works with.

An op kind is one entry that holds everything cgmq knows about one kind of
operation, so that adding an op is one entry plus tests:

* **fx targets**: the modules, functions and methods that are this op, and how
  a module call becomes a functional call whose weight is an explicit
  ``get_attr`` node (:meth:`ComputeOp.functionalize`, :meth:`ComputeOp.match`);
* **MACs** of one call from the shapes that ``ShapeProp`` recorded with a
  batch-1 example (:meth:`ComputeOp.macs`);
* **ONNX layout**: how its weight is stored for the node that consumes it in
  the exported file (:meth:`ComputeOp.export_weight`);
* **read-back**: which ONNX node types compute it in any QDQ file, which of
  their inputs are the activation and the weight, and their MACs from inferred
  shapes (:meth:`ComputeOp.read`).

Ops without MACs that a runtime can still run as integer kernels (residual
adds, concatenation, pooling) are :class:`TensorOp` entries; they decide where
the extra quantizers of an integer target go (see :mod:`cgmq_cli.graph.placement`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from onnx import TensorProto as TP
from torch import fx, nn

aten = torch.ops.aten


@dataclass(frozen=True)
class Call:
    """One quantizable call site in an fx graph (after :meth:`ComputeOp.functionalize`)."""

    node: fx.Node
    kind: "ComputeOp"
    layer: str  # the layer: a module path, or the stem of the weight attribute
    op: str  # the reported op kind, e.g. "conv2d", "depthwise", "linear", "matmul"
    weight: fx.Node | None  # get_attr node of the weight; None for activation x activation
    inputs: tuple[fx.Node, ...]  # activation operands, in operand order
    bias: Any = None  # get_attr node of the bias, or None


@dataclass(frozen=True)
class Read:
    """What a QDQ file says about one compute node (read-back)."""

    act: str | None  # name of the (left) activation input (None: a lookup, whose input is indices)
    weight: str  # name of the weight input (or the right activation of act x act)
    macs: int  # per example
    bias: str | None = None
    weight_is_activation: bool = False  # act x act: both widths are activation widths
    # Integer kernels (QLinearConv, MatMulInteger, QGemm, ...) read integer tensors themselves, not
    # DequantizeLinear outputs: their element types, as the node declares them (its zero points), or
    # None to read the width from the graph (Q/DQ).
    act_type: int | None = None
    weight_type: int | None = None
    note: str = ""  # e.g. "activation quantized to uint8 at run time"


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional argument ``index`` of a call, or its keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def positional(node: fx.Node, names: Sequence[str]) -> None:
    """Move the leading operands ``names`` given by keyword (``F.linear(x, weight=w)``) to positions.

    Graph passes and the export then find the input, weight and bias at args[0..2].
    """
    args, kwargs = list(node.args), dict(node.kwargs)
    for i, name in enumerate(names):
        if len(args) > i:
            continue
        if name not in kwargs:
            if any(n in kwargs for n in names[i + 1:]):
                args.append(None)  # e.g. bias omitted: None keeps later operands in place
                continue
            break
        args.append(kwargs.pop(name))
    node.args, node.kwargs = tuple(args), kwargs


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The shape ShapeProp recorded for an fx node (None when it is not a tensor)."""
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def per_example(shape: Sequence[int]) -> int:
    """Elements of a tensor computed for the batch-1 example: all of them, since a model may fold
    windows or heads into dimension 0 (Swin's window attention runs on (batch x windows, ...))."""
    return int(torch.Size(list(shape)).numel())


def is_param_attr(gm: fx.GraphModule, node: Any) -> bool:
    """A ``get_attr`` node that reads a parameter or buffer (a weight)."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return False
    try:
        value = gm.get_parameter(node.target)
    except AttributeError:
        try:
            value = gm.get_buffer(node.target)
        except AttributeError:
            return False
    return isinstance(value, torch.Tensor)


def attr_tensor(gm: nn.Module, target: str) -> torch.Tensor:
    try:
        return gm.get_parameter(target)
    except AttributeError:
        return gm.get_buffer(target)


def call_function_for(gm: fx.GraphModule, node: fx.Node, fn: Any, args: Any) -> fx.Node:
    """Replace the module call ``node`` by ``fn(*args(param))``; ``param(name)`` reads the module's parameter."""
    graph = gm.graph
    with graph.inserting_before(node):
        new = graph.call_function(fn, args(lambda name: graph.get_attr(f"{node.target}.{name}")))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def claim_weight(rw: Any, node: Any, mark: Any, op_type: str, index: int) -> Any:
    """The ONNX consumer that reads weight marker ``node`` as its input ``index`` (of ``op_type``), now
    written as that layer's compute node with the integer weight codes (axis as stored); None if it is not one."""
    out = node.output[0]
    user = rw.sole_consumer(out, mark)
    if user.op_type != op_type or user.input[index] != out:
        return None
    rw.compute_node(user, mark)
    rw.replace[id(node)] = rw.weight_nodes(mark, out, transposed=False)
    return user


def layer_name(weight_target: str) -> str:
    return weight_target[: -len(".weight")] if weight_target.endswith(".weight") else weight_target


def onnx_input(node: Any, index: int) -> str | None:
    """Input ``index`` of an ONNX node, or None when absent (an empty name is an omitted optional input)."""
    return node.input[index] if len(node.input) > index and node.input[index] else None


def integer_type(g: Any, node: Any, data: int, zero_point: int | None) -> int | None:
    """The integer element type of operand ``data`` of an integer kernel: its zero point's type, else its own."""
    for index in (zero_point, data):
        name = onnx_input(node, index) if index is not None else None
        elem = g.types.get(name) if name else None
        if elem in _INTEGER_ELEM_TYPES:
            return elem
    return None


def weight_shape(g: Any, name: str) -> list[int] | None:
    """The static shape of a weight: inferred, else that of the initializer it is computed from."""
    shape = g.shapes.get(name)
    if shape and None not in shape:
        return shape
    origin = g.origin_const(name)
    return list(g.consts[origin].dims) if origin is not None else None


_INTEGER_ELEM_TYPES = frozenset({TP.UINT8, TP.INT8, TP.UINT16, TP.INT16, TP.INT32, TP.UINT32, TP.UINT4, TP.INT4,
                                 TP.UINT2, TP.INT2})


class ComputeOp:
    """An op with MACs: a weight (or a second activation) times an activation."""

    name: ClassVar[str]  # registry key and default reported kind
    profile_kind: ClassVar[str]  # key under a profile's per_op
    integer: ClassVar[str]  # name in a profile's integer_ops
    modules: ClassVar[tuple[type, ...]] = ()
    functions: ClassVar[tuple[Any, ...]] = ()
    methods: ClassVar[tuple[str, ...]] = ()
    onnx_ops: ClassVar[tuple[str, ...]] = ()
    weight_axis: ClassVar[int] = 0  # the weight's output-channel axis (per-channel steps)
    # Whether the integer kernel needs its output quantized (onnxruntime fuses Conv only with a Q after
    # it; MatMul and Gemm have float-output integer kernels: MatMulIntegerToFloat, QGemm).
    output_quantized: ClassVar[bool] = False

    # -- fx --------------------------------------------------------------------
    def functionalize(self, gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> fx.Node:
        """Replace a module call by the functional call on ``get_attr`` weights; returns the new node."""
        raise NotImplementedError

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Call | None:
        """The call at ``node`` if it is this op with a parameter weight, else None."""
        raise NotImplementedError

    def macs(self, call: Call) -> int:
        raise NotImplementedError

    # -- ONNX ------------------------------------------------------------------
    def export_weight(self, rewriter: Any, node: Any, mark: Any) -> bool:
        """Write the weight of ``mark`` for its consumer; False when the consumer is not this op's."""
        return False

    def read(self, graph: Any, node: Any, batch: int) -> Read | None:
        raise NotImplementedError


class TensorOp:
    """An op without MACs that integer targets run on quantized tensors (add, concat, pooling)."""

    name: ClassVar[str]
    integer: ClassVar[str]  # name in a profile's integer_ops
    modules: ClassVar[tuple[type, ...]] = ()
    functions: ClassVar[tuple[Any, ...]] = ()
    methods: ClassVar[tuple[str, ...]] = ()
    onnx_ops: ClassVar[tuple[str, ...]] = ()
    output_quantized: ClassVar[bool] = True  # QLinearAdd, QLinearConcat, QLinearAveragePool write integers

    def matches(self, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
        return _targets(node, modules, self.modules, self.functions, self.methods)

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        """The operands that must be quantized for an integer kernel."""
        out = []
        for a in node.args:
            items = a if isinstance(a, (list, tuple)) else (a,)
            out += [x for x in items if isinstance(x, fx.Node) and shape_of(x) is not None]
        return list(dict.fromkeys(out))


def _targets(node: fx.Node, modules: dict[str, nn.Module], module_types: tuple, functions: tuple,
             methods: tuple) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), module_types) if module_types else False
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False
