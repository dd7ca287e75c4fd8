"""GraphModule -> GraphModule passes: fold BatchNorm, insert gated quantizers.

After :func:`insert_quantizers`, every quantizable call (Conv1d/Conv2d/Linear
modules and their functional forms with a parameter weight) reads

    F.convNd / F.linear( act_quantizer(x), weight_quantizer(W), bias, ... )

as plain ``call_function`` nodes, whether it came from a module or not. The
quantizers live in ``gm.cgmq[<layer key>]`` (``.weight`` and ``.act``); a
module or weight used at several call sites shares one pair. Everything else in
the graph is left exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cgmq_cli.errors import TraceError
from cgmq_cli.quant.modules import GatedQuantizer

aten = torch.ops.aten

# One registry: what counts as a quantizable op, and its functional form.
MODULE_OPS: dict[type, tuple[str, Callable]] = {
    nn.Conv1d: ("conv1d", F.conv1d),
    nn.Conv2d: ("conv2d", F.conv2d),
    nn.Linear: ("linear", F.linear),
}
FUNCTION_OPS: dict[Callable, str] = {
    F.conv1d: "conv1d",
    F.conv2d: "conv2d",
    F.linear: "linear",
    torch.conv1d: "conv1d",
    torch.conv2d: "conv2d",
    aten.conv1d.default: "conv1d",
    aten.conv2d.default: "conv2d",
    aten.linear.default: "linear",
}
QUANT_ROOT = "cgmq"


@dataclass(frozen=True)
class LayerInfo:
    """One quantized layer: a weight and the input activation(s) of its call sites."""

    name: str
    key: str
    op: str  # "conv2d" | "depthwise" | "conv1d" | "linear"
    weight_shape: tuple[int, ...]
    bias_params: int
    calls: tuple[str, ...]  # fx node names of the call sites, in graph order
    takes_network_input: bool

    @property
    def params(self) -> int:
        return int(torch.Size(self.weight_shape).numel())


WidthsFn = Callable[[str, str, int, int], tuple[tuple[int, ...], tuple[int, ...]]]


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every BatchNorm that directly follows a conv module into that conv.

    Only folds when the conv's output feeds nothing but the BN and both modules
    are called once (folding a shared conv would change its other uses). The
    folded conv keeps the conv's name, so layer names stay the user's.
    """
    modules = dict(gm.named_modules())
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            uses[node.target] = uses.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        conv_node = node.args[0]
        if not (isinstance(conv_node, fx.Node) and conv_node.op == "call_module"):
            continue
        conv, bn = modules.get(conv_node.target), modules[node.target]
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d)) or len(conv_node.users) != 1:
            continue
        if uses[conv_node.target] != 1 or uses[node.target] != 1 or not bn.track_running_stats:
            continue
        fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
        _set_submodule(gm, conv_node.target, fused)
        node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def _op_kind(base: str, weight: torch.Tensor, groups: int) -> str:
    if base == "conv2d" and groups > 1 and weight.shape[1] == 1:
        return "depthwise"
    return base


def _candidates(gm: fx.GraphModule) -> list[tuple[fx.Node, str, str, Callable | None]]:
    """(node, layer name, base op, functional op for module calls) for every quantizable call."""
    modules = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(modules.get(node.target)) in MODULE_OPS:
            base, fn = MODULE_OPS[type(modules[node.target])]
            module = modules[node.target]
            if getattr(module, "padding_mode", "zeros") != "zeros":
                raise TraceError(
                    f"layer `{node.target}` uses padding_mode={module.padding_mode!r}, which cgmq cannot quantize",
                    "use zero padding, or keep its parent untraced with --leaf",
                )
            found.append((node, node.target, base, fn))
        elif node.op == "call_function" and node.target in FUNCTION_OPS:
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                name = weight.target[: -len(".weight")] if weight.target.endswith(".weight") else weight.target
                found.append((node, name, FUNCTION_OPS[node.target], None))
    return found


def insert_quantizers(
    gm: fx.GraphModule,
    widths_for: WidthsFn,
    input_bits: int = 8,
    signedness: str = "auto",
    per_channel: bool = True,
) -> tuple[fx.GraphModule, list[LayerInfo]]:
    """Put a weight quantizer and an input quantizer on every quantizable call.

    ``widths_for(name, op, index, n_layers)`` gives each layer's allowed
    (weight, activation) widths. A layer whose input is the network input gets
    its activation width fixed to ``input_bits``.
    """
    candidates = _candidates(gm)
    names = list(dict.fromkeys(name for _, name, _, _ in candidates))
    qroot = nn.ModuleDict()
    gm.add_module(QUANT_ROOT, qroot)
    records: dict[str, dict] = {}
    for node, name, base, fn in candidates:
        key = name.replace(".", "_") or "root"
        graph = gm.graph
        with graph.inserting_before(node):
            if fn is not None:  # module call -> functional call on quantized operands
                module = gm.get_submodule(name)
                x, = node.args
                w_node = graph.get_attr(f"{name}.weight")
                b_node = graph.get_attr(f"{name}.bias") if module.bias is not None else None
                extra = () if base == "linear" else (module.stride, module.padding, module.dilation, module.groups)
                weight, groups = module.weight, getattr(module, "groups", 1)
            else:
                _positional_operands(node)
                x, w_node = node.args[0], node.args[1]
                b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
                weight = gm.get_parameter(w_node.target) if _is_param(gm, w_node.target) else gm.get_buffer(w_node.target)
                groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
            op = _op_kind(base, weight, groups)
            if key not in qroot:
                w_bits, a_bits = widths_for(name, op, names.index(name), len(names))
                if isinstance(x, fx.Node) and x.op == "placeholder":
                    a_bits = (input_bits,)
                channels = weight.shape[0] if per_channel else None
                qroot[key] = nn.ModuleDict({
                    "weight": GatedQuantizer("weight", w_bits, channels),
                    "act": GatedQuantizer("act", a_bits, None, signedness),
                })
                records[key] = dict(name=name, key=key, op=op, weight_shape=tuple(weight.shape),
                                    bias_params=_bias_numel(gm, b_node), calls=[],
                                    takes_network_input=isinstance(x, fx.Node) and x.op == "placeholder")
            xq = graph.call_module(f"{QUANT_ROOT}.{key}.act", (x,))
            wq = graph.call_module(f"{QUANT_ROOT}.{key}.weight", (w_node,))
            if fn is not None:
                new = graph.call_function(fn, (xq, wq, b_node, *extra))
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                records[key]["calls"].append(new.name)
            else:
                node.args = (xq, wq, *node.args[2:])
                records[key]["calls"].append(node.name)
    gm.graph.lint()
    gm.recompile()
    layers = [LayerInfo(**{**r, "calls": tuple(r["calls"])}) for r in records.values()]
    return gm, layers


def _positional_operands(node: fx.Node) -> None:
    """Move ``input``/``weight`` passed by keyword (``F.linear(x, weight=w)``) to positions 0 and 1."""
    if len(node.args) >= 2:
        return
    args, kwargs = list(node.args), dict(node.kwargs)
    if not args:
        args.append(kwargs.pop("input"))
    args.append(kwargs.pop("weight"))
    node.args, node.kwargs = tuple(args), kwargs


def _is_param(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _bias_numel(gm: fx.GraphModule, b_node: object) -> int:
    if isinstance(b_node, fx.Node) and b_node.op == "get_attr":
        return int(getattr(gm.get_submodule(b_node.target.rpartition(".")[0]) if "." in b_node.target else gm,
                           b_node.target.rpartition(".")[2]).numel())
    return 0


def quantizers(gm: nn.Module) -> dict[str, tuple[GatedQuantizer, GatedQuantizer]]:
    """Layer key -> (weight quantizer, activation quantizer)."""
    root = getattr(gm, QUANT_ROOT)
    return {key: (pair["weight"], pair["act"]) for key, pair in root.items()}
