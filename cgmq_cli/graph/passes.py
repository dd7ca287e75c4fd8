"""GraphModule -> GraphModule passes: fold BatchNorm, functional calls, insert gated quantizers.

After :func:`insert_quantizers` every quantizable call (an entry of
:mod:`cgmq_cli.ops`, called as a module or functionally on a parameter
weight) reads

    op( act_quantizer(x), weight_quantizer(W), bias, ... )

as a plain ``call_function`` node. Quantizers live in ``gm.cgmq[<key>]``:
``w_<layer>`` for a layer's weight (shared by its call sites) and
``a_<tensor>`` for an activation tensor (shared by every op that reads it;
see :mod:`cgmq_cli.graph.placement` for where they go). Everything else in
the graph is left as it was.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cgmq_cli import ops
from cgmq_cli.graph import placement
from cgmq_cli.quant.modules import GatedQuantizer

QUANT_ROOT = "cgmq"

WidthsFn = Callable[[str, str, int, int], tuple[tuple[int, ...], tuple[int, ...]]]


@dataclass(frozen=True)
class QuantSpec:
    """What the profile says about quantizer insertion."""

    widths_for: WidthsFn
    input_bits: int = 8
    signedness: str = "auto"
    per_channel: bool = True
    integer_ops: frozenset[str] = frozenset()
    reduce_range: bool = False
    integer_width: int = 8  # the width of quantizers that no compute op reads (integer kernels' operands)


@dataclass(frozen=True)
class LayerInfo:
    """One call site of a quantized layer: its operands' quantizers and what the cost model counts."""

    name: str  # the layer, with "#k" for its k-th extra call site
    layer: str
    op: str  # "conv2d" | "depthwise" | "conv1d" | "linear" | ...
    node: str  # fx node name of the call
    weight_key: str | None  # quantizer of the weight (None: activation x activation)
    act_keys: tuple[str, ...]  # quantizers of the activation operands, in operand order (none: a lookup)
    weight_shape: tuple[int, ...]
    params: int  # weight elements stored (0 at a repeated call site)
    bias_params: int
    takes_network_input: bool
    integer: str  # the profile's integer_ops name of the op
    macs: int = 0  # per example
    bias: str | None = None  # the bias attribute (a float parameter counted with the layer)

    @property
    def cost_keys(self) -> tuple[str | None, str | None]:
        """(the quantizer in the weight slot, the one in the input slot) of the cost model:
        an activation product puts its right operand in the weight slot; a lookup has no input."""
        if self.weight_key is None:
            return self.act_keys[1], self.act_keys[0]
        return self.weight_key, (self.act_keys[0] if self.act_keys else None)


@dataclass(frozen=True)
class QuantizerInfo:
    """One quantizer: what it quantizes (for reports and the export)."""

    key: str
    kind: str  # "weight" | "act"
    tensor: str  # fx node name (act) or weight attribute (weight)
    layers: tuple[str, ...]  # the layers whose cost it sets
    aliases: tuple[str, ...] = ()  # fx node names of grid-preserving outputs carrying its grid

    @property
    def label(self) -> str:
        if self.kind == "weight":
            return f"weight of {self.layers[0]}"
        if self.layers:
            return f"input of {', '.join(self.layers)}"
        return f"output of {self.tensor} (integer-kernel operand, no gate)"


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


def _aten_batchnorm(node: fx.Node) -> tuple[fx.Node, tuple, float] | None:
    """(input, (weight, bias, mean, var), eps) of an eval-mode aten batch norm call whose result is used as a tensor."""
    aten = torch.ops.aten
    if node.op != "call_function":
        return None
    if node.target == aten.batch_norm.default:
        x, weight, bias, mean, var, training, _momentum, eps = node.args[:8]
        return None if training else (x, (weight, bias, mean, var), float(eps))
    if node.target == aten._native_batch_norm_legit_no_training.default:
        x, weight, bias, mean, var, _momentum, eps = node.args[:7]
        return x, (weight, bias, mean, var), float(eps)
    return None


def _attr(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr" and _has_attr(gm, str(node.target)):
        return ops.base.attr_tensor(gm, str(node.target))
    return None


def fold_aten_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold aten-level ``conv1d/conv2d -> batch_norm`` (a ``.pt2`` program) into the conv's weight and bias.

    ``W' = W * g / sqrt(v + eps)`` per output channel and
    ``b' = (b - m) * g / sqrt(v + eps) + beta``. Folds only an eval-mode batch
    norm whose input is a conv call that feeds nothing else, with the conv's
    weight and bias and the norm's statistics all ``get_attr`` tensors read by
    this conv alone (a shared weight is left as it is).
    """
    aten = torch.ops.aten
    reads: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            reads[str(node.target)] = reads.get(str(node.target), 0) + len(node.users)
    for node in list(gm.graph.nodes):
        found = _aten_batchnorm(node)
        if found is None:
            continue
        conv, stats, eps = found
        if not (isinstance(conv, fx.Node) and conv.op == "call_function"
                and conv.target in (aten.conv1d.default, aten.conv2d.default) and len(conv.users) == 1):
            continue
        weight_node = conv.args[1]
        bias_node = conv.args[2] if len(conv.args) > 2 else conv.kwargs.get("bias")
        weight, bias = _attr(gm, weight_node), _attr(gm, bias_node)
        gamma, beta, mean, var = (_attr(gm, n) for n in stats)
        if weight is None or mean is None or var is None or reads.get(str(weight_node.target)) != 1 \
                or (bias_node is not None and (bias is None or reads.get(str(bias_node.target)) != 1)) \
                or any(n is not None and _attr(gm, n) is None for n in stats[:2]):
            continue
        getitem = None
        if node.target == aten._native_batch_norm_legit_no_training.default:
            users = list(node.users)
            if not all(u.op == "call_function" and u.target is operator.getitem for u in users) \
                    or any(u.args[1] != 0 for u in users):
                continue
            getitem = users
        with torch.no_grad():
            scale = (gamma if gamma is not None else torch.ones_like(var)) / torch.sqrt(var + eps)
            new_weight = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
            new_bias = ((bias if bias is not None else torch.zeros_like(mean)) - mean) * scale \
                + (beta if beta is not None else torch.zeros_like(mean))
        _set_tensor(gm, str(weight_node.target), new_weight)
        if bias_node is not None:
            _set_tensor(gm, str(bias_node.target), new_bias)
        else:
            target = str(weight_node.target).rpartition(".")[0]
            target = f"{target}.bias" if target else "bias"
            while _has_attr(gm, target):
                target += "_folded"
            _set_tensor(gm, target, new_bias)
            with gm.graph.inserting_before(conv):
                bias_node = gm.graph.get_attr(target)
            args = list(conv.args) + [None] * (3 - len(conv.args))
            args[2] = bias_node
            conv.args = tuple(args)
            conv.kwargs = {k: v for k, v in conv.kwargs.items() if k != "bias"}
        for user in getitem or [node]:
            user.replace_all_uses_with(conv)
        for user in getitem or []:
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        for stat in stats:
            if isinstance(stat, fx.Node) and stat.op == "get_attr" and not stat.users:
                gm.graph.erase_node(stat)
    gm.graph.lint()
    gm.recompile()
    return gm


def batchnorms(gm: fx.GraphModule) -> list[str]:
    """The batch norms left in the graph (not folded): they run in float and are not counted in the cost."""
    modules = dict(gm.named_modules())
    left = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            left.append(str(node.target))
        elif node.op == "call_function" and str(getattr(node.target, "__name__", node.target)).startswith(
                ("batch_norm", "_native_batch_norm", "native_batch_norm")):
            left.append(node.name)
    return left


def _has_attr(root: nn.Module, target: str) -> bool:
    try:
        ops.base.attr_tensor(root, target)
        return True
    except AttributeError:
        return False


def _set_tensor(root: nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace (or add, as a parameter) the parameter or buffer at ``target`` with ``value``."""
    parent_name, _, attr = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    value = value.detach().clone()
    if attr in parent._buffers:
        parent._buffers[attr] = value
    else:
        parent._parameters.pop(attr, None)
        parent.register_parameter(attr, nn.Parameter(value))


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def functionalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Every module call of a registry op becomes its functional call on ``get_attr`` weights."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            op = ops.module_op(modules.get(node.target))
            if op is not None:
                op.functionalize(gm, node, modules[node.target])
    gm.graph.lint()
    gm.recompile()
    return gm


def _key(prefix: str, name: str, taken: set[str]) -> str:
    key = f"{prefix}_{re.sub(r'[^0-9A-Za-z_]', '_', name) or 'root'}"
    base, i = key, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    taken.add(key)
    return key


def insert_quantizers(gm: fx.GraphModule, spec: QuantSpec) -> tuple[list[LayerInfo], dict[str, QuantizerInfo]]:
    """Put a weight quantizer on every quantizable call and an activation quantizer on every planned tensor.

    ``gm`` must be functionalized and shape-propagated (``ShapeProp``) with a
    batch-1 example. ``spec.widths_for(name, op, index, n_layers)`` gives a
    layer's allowed (weight, activation) widths.
    """
    calls = [c for c in (ops.match(gm, n) for n in list(gm.graph.nodes)) if c is not None]
    names = list(dict.fromkeys(c.layer for c in calls))
    widths = {name: None for name in names}
    for c in calls:
        if widths[c.layer] is None:
            widths[c.layer] = spec.widths_for(c.layer, c.op, names.index(c.layer), len(names))
    plans = placement.plan(gm, calls, lambda c: widths[c.layer][1], spec.input_bits, spec.integer_ops)
    qroot = nn.ModuleDict()
    gm.add_module(QUANT_ROOT, qroot)
    taken: set[str] = set()
    infos: dict[str, QuantizerInfo] = {}
    act_key: dict[fx.Node, str] = {}
    graph = gm.graph
    layer_of = {c.node: c.layer for c in calls}
    for tensor, p in plans.items():
        key = _key("a", layer_of.get(tensor, tensor.name), taken)  # a layer's output is named after the layer
        allowed = p.allowed if p.allowed is not None else (spec.integer_width,)
        qroot[key] = GatedQuantizer("act", allowed, None, spec.signedness, upper=p.upper)
        with graph.inserting_after(tensor):
            qnode = graph.call_module(f"{QUANT_ROOT}.{key}", (tensor,))
        if spec.integer_ops:  # integer kernels: every reader reads the quantized tensor
            tensor.replace_all_uses_with(qnode, delete_user_cb=lambda user, q=qnode: user is not q)
        else:
            for reader in p.readers:
                reader.replace_input_with(tensor, qnode)
        act_key[tensor] = key
        for alias in p.aliases:
            act_key[alias] = key
        infos[key] = QuantizerInfo(key, "act", layer_of.get(tensor, tensor.name), tuple(p.layers),
                                   tuple(a.name for a in p.aliases))
    weight_key: dict[str, str] = {}
    layers: list[LayerInfo] = []
    seen: dict[str, int] = {}
    for call in calls:
        weight = ops.base.attr_tensor(gm, call.weight.target) if call.weight is not None else None
        if weight is not None and call.layer not in weight_key:
            key = weight_key[call.layer] = _key("w", call.layer, taken)
            axis = call.kind.weight_axis
            channels = weight.shape[axis] if spec.per_channel else None
            qroot[key] = GatedQuantizer("weight", widths[call.layer][0], channels, reduced=spec.reduce_range, axis=axis)
            infos[key] = QuantizerInfo(key, "weight", call.weight.target, (call.layer,))
        if weight is not None:
            with graph.inserting_before(call.node):
                wq = graph.call_module(f"{QUANT_ROOT}.{weight_key[call.layer]}", (call.weight,))
            call.node.replace_input_with(call.weight, wq)
        k = seen.get(call.layer, 0)
        seen[call.layer] = k + 1
        bias = ops.base.attr_tensor(gm, call.bias.target) if ops.base.is_param_attr(gm, call.bias) else None
        operands = tuple(act_key[x] for x in call.inputs)
        layers.append(LayerInfo(
            name=call.layer if k == 0 else f"{call.layer}#{k}", layer=call.layer, op=call.op, node=call.node.name,
            weight_key=weight_key.get(call.layer), act_keys=operands,
            weight_shape=tuple(weight.shape) if weight is not None else (),
            params=int(weight.numel()) if weight is not None and k == 0 else 0,
            bias_params=int(bias.numel()) if bias is not None and k == 0 else 0,
            takes_network_input=any(x.op == "placeholder" for x in call.inputs), integer=call.kind.integer,
            macs=call.kind.macs(call), bias=str(call.bias.target) if bias is not None else None))
    graph.lint()
    gm.recompile()
    return layers, infos


def quantizers(gm: nn.Module) -> dict[str, GatedQuantizer]:
    """Quantizer key -> quantizer, in insertion order (activations first, then weights)."""
    return dict(getattr(gm, QUANT_ROOT).items())
