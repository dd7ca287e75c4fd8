"""Where activation quantizers go: one per tensor, wherever an op needs that tensor quantized.

* Every compute op (conv, linear, ...) needs its activation operands
  quantized; their allowed widths are the intersection of what the profile
  allows for each layer that reads the tensor (the network input: the
  profile's ``input_bits``).
* On a profile with integer kernels (``integer_ops``), an integer op whose
  kernel writes integers (conv, add, concat, pooling: ``output_quantized`` in
  the registry) also needs its *output* quantized, after a ReLU-like
  activation that the runtime fuses (onnxruntime fuses
  ``DQ -> op -> [Relu/Clip] -> Q`` only when that Q is the op's sole
  consumer; linear and matmul have float-output integer kernels), and the
  tensor ops among ``integer_ops`` (add,
  concat, pooling) need their inputs quantized. Every reader of such a tensor
  then reads the quantized value, and a request on the output of a
  grid-preserving op (max-pooling, flatten, ...) moves to that op's input: the
  output carries the same grid (an *alias*, which the export surrounds with
  Q/DQ of the same parameters, as onnxruntime requires to run the op on the
  quantized type).
* A tensor that no compute op reads (a residual branch before its add, an
  add's output that only feeds another add) has no gate: it takes the
  profile's integer width (8 on int8-cpu) and costs no BOPs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from torch import fx, nn

from cgmq_cli import ops
from cgmq_cli.errors import ProfileError


@dataclass
class TensorPlan:
    """One activation quantizer: the tensor it quantizes and who reads it."""

    node: fx.Node
    allowed: tuple[int, ...] | None = None  # None: no compute op reads it (integer width, no gate)
    layers: list[str] = field(default_factory=list)  # the compute layers that read it
    readers: list[fx.Node] = field(default_factory=list)  # nodes that read the quantized value
    aliases: list[fx.Node] = field(default_factory=list)  # grid-preserving outputs carrying its grid
    upper: float | None = None  # known upper bound of the tensor (ReLU6: 6)
    network_input: bool = False


def _feeds_output(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` reaches a graph output directly or through grid-preserving ops."""
    return any(u.op == "output" or (ops.is_passthrough(u, modules) and _feeds_output(u, modules)) for u in node.users)


def plan(gm: fx.GraphModule, calls: Sequence[ops.Call], allowed_for: Callable[[ops.Call], tuple[int, ...]],
         input_bits: int, integer_ops: frozenset[str]) -> dict[fx.Node, TensorPlan]:
    """The activation quantizers of ``gm`` (node -> plan), in graph order."""
    modules = dict(gm.named_modules())
    integer = bool(integer_ops)
    plans: dict[fx.Node, TensorPlan] = {}

    def request(tensor: fx.Node, reader: fx.Node, allowed: tuple[int, ...] | None, layer: str | None) -> None:
        path = []
        while integer and ops.is_passthrough(tensor, modules) and isinstance(tensor.args[0], fx.Node):
            path.append(tensor)
            tensor = tensor.args[0]
        p = plans.setdefault(tensor, TensorPlan(tensor, network_input=tensor.op == "placeholder"))
        if p.network_input:
            allowed = (input_bits,)
        if allowed is not None:
            common = tuple(b for b in allowed if p.allowed is None or b in p.allowed)
            if not common:
                raise ProfileError(f"tensor `{tensor.name}` is read by {', '.join(p.layers + [layer or '?'])}, whose "
                                   f"allowed input widths ({p.allowed} and {allowed}) have no width in common",
                                   "let the profile allow one input width for every layer that reads a tensor")
            p.allowed = common
        if layer is not None and layer not in p.layers:
            p.layers.append(layer)
        if reader not in p.readers:
            p.readers.append(reader)
        p.aliases += [a for a in path if a not in p.aliases]

    for call in calls:
        for operand in call.inputs:
            if isinstance(operand, fx.Node):
                request(operand, call.node, allowed_for(call), call.layer)
    if integer:
        for node in list(gm.graph.nodes):
            op = ops.tensor_op(node, modules)
            if op is not None and op.integer in integer_ops:
                for operand in op.tensor_inputs(node):
                    request(operand, node, None, None)
        producers = [c.node for c in calls if c.kind.integer in integer_ops and c.kind.output_quantized]
        producers += [n for n in gm.graph.nodes if (op := ops.tensor_op(n, modules)) is not None
                      and op.integer in integer_ops]
        for node in producers:
            out = node
            if len(node.users) == 1 and ops.fused_activation(next(iter(node.users)), modules)[0]:
                out = next(iter(node.users))
            if not _feeds_output(out, modules) and out.users:
                request(out, next(iter(out.users)), None, None)
    for p in plans.values():
        fused, upper = ops.fused_activation(p.node, modules) if p.node.op != "placeholder" else (False, None)
        p.upper = upper if fused else None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return dict(sorted(plans.items(), key=lambda item: order[item[0]]))
