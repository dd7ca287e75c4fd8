"""Compute that stays float: MACs of every graph node that is not a quantized layer, and why.

Each such node runs once on the batch-1 example under ``torch.utils.flop_counter``
(MACs = FLOPs / 2). A node that computes something is float compute: a leaf
module (``--leaf``, or a module fx keeps whole), a wrapped Python function, or
an op the registry does not quantize (Conv3d, ConvTranspose, einsum, ...).
Its MACs count at 32 x 32 bits in BOPs and in the relative-BOPs denominator,
so a budget means the whole model and the report says what is left out.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


@dataclass(frozen=True)
class FloatOp:
    node: str  # fx node name
    what: str  # the module path, function or op
    reason: str
    macs: int  # per example

    def as_dict(self) -> dict:
        return asdict(self)


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of CPU flash attention (not in torch's table): 2 x (q @ k^T) + 2 x (p @ v)."""
    b, h, lq, d = query_shape
    s, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * s * d + 2 * b * h * lq * s * dv


def _custom_flops() -> dict:
    """Formulas torch's counter lacks (it passes the argument shapes, as for its own table)."""
    op = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_cpu_flops} if op is not None else {}


class _Counter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, skip: set[str], leaves: set[str]) -> None:
        super().__init__(gm)
        self.skip, self.leaves = skip, leaves
        self.modules = dict(gm.named_modules())
        self.found: list[FloatOp] = []
        self.custom = _custom_flops()

    def run_node(self, n: fx.Node):
        if n.op in ("placeholder", "get_attr", "output") or n.name in self.skip \
                or (n.op == "call_module" and str(n.target).startswith("cgmq.")):
            return super().run_node(n)
        counter = FlopCounterMode(display=False, custom_mapping=self.custom)
        with counter:
            out = super().run_node(n)
        flops = counter.get_total_flops()
        if flops > 0:
            self.found.append(FloatOp(n.name, *self._describe(n), macs=int(flops // 2)))
        return out

    def _describe(self, n: fx.Node) -> tuple[str, str]:
        if n.op == "call_module":
            module = self.modules.get(n.target)
            if n.target in self.leaves:
                return str(n.target), f"kept untraced (--leaf), {type(module).__name__}"
            return str(n.target), f"{type(module).__name__} is not an op cgmq quantizes"
        target = n.target
        name = getattr(target, "__name__", str(target))
        module = getattr(target, "__module__", "") or ""
        if n.op == "call_function" and not isinstance(target, torch._ops.OpOverload) \
                and not module.startswith("torch") and not module.startswith("_operator"):
            return name, "wrapped function: traced as one call"
        return name, "op that cgmq does not quantize"


@contextlib.contextmanager
def _no_mha_fastpath():
    """nn.MultiheadAttention's eval fast path (one fused op) hides its FLOPs from the counter."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def float_compute(gm: fx.GraphModule, example: torch.Tensor, quantized: set[str],
                  leaves: set[str] = frozenset()) -> list[FloatOp]:
    """Every node outside ``quantized`` (fx node names of quantized layer calls) that computes, with its MACs."""
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad(), _no_mha_fastpath():
            counter = _Counter(gm, quantized, set(leaves))
            counter.run(example)
    finally:
        gm.train(was_training)
    return counter.found


def float_parameters(gm: fx.GraphModule, quantized_weights: set[str], biases: set[str]) -> int:
    """Elements of the parameters and float buffers the graph uses in float (LayerNorm, embeddings left
    float, class tokens, unfolded BatchNorm, leaf modules), without quantized weights, their biases and the
    quantizers. Modules the graph no longer calls (a folded BatchNorm) do not count."""
    modules = dict(gm.named_modules())
    used: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _attr(gm, str(node.target))
            if isinstance(value, torch.Tensor):
                used[str(node.target)] = value
        elif node.op == "call_module" and not str(node.target).startswith("cgmq."):
            module = modules[node.target]
            for name, t in list(module.named_parameters()) + list(module.named_buffers()):
                used[f"{node.target}.{name}"] = t
    seen: set[int] = set()
    total = 0
    for name, tensor in used.items():
        if name in quantized_weights or name in biases or id(tensor) in seen or not tensor.is_floating_point():
            continue
        seen.add(id(tensor))
        total += tensor.numel()
    return total


def _attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj
