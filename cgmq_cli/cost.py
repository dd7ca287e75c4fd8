"""Cost model: MACs by shape propagation; BOPs, relative BOPs, weight bytes.

    MAC_l   = output elements per example x (Cin / groups) x kernel size      (conv)
            = output elements per example x in_features                       (linear)
    BOPs    = sum_l MAC_l * b_w,l * b_a,l
    rel     = 100 * BOPs / sum_l (MAC_l * 32 * 32)        (percent)
    bytes   = sum_l params_l * b_w,l / 8  +  4 * bias_params_l   (float biases)

With a cost table (a hardware profile's cycles or energy per MAC at each
(b_w, b_a)), ``cost = sum_l MAC_l * table[b_w, b_a]``; without one the cost is
the BOPs. Cost knows nothing of training: it maps widths to numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from cgmq_cli.budget import Budget  # noqa: F401 - re-exported: budgets are compared with CostSummary

FLOAT_BITS = 32
BIAS_BYTES = 4


@dataclass(frozen=True)
class LayerShape:
    """What the cost model needs to know of one quantized layer."""

    name: str
    op: str
    macs: int
    params: int
    bias_params: int = 0


@dataclass(frozen=True)
class LayerCost:
    name: str
    op: str
    macs: int
    params: int
    bits_w: int
    bits_a: int
    bops: int
    cost: float
    weight_bytes: float


@dataclass(frozen=True)
class CostSummary:
    layers: tuple[LayerCost, ...]
    macs: int
    params: int
    bops: int
    bops_fp32: int
    rel_bops: float  # percent of 32x32 BOPs
    weight_bytes: float
    cost: float  # == bops without a cost table

    def as_dict(self) -> dict:
        return {"bops": self.bops, "rel_bops": self.rel_bops, "weight_bytes": self.weight_bytes,
                "cost": self.cost, "macs": self.macs, "bops_fp32": self.bops_fp32}


MacCost = Callable[[int, int], float]


def bops_per_mac(bits_w: int, bits_a: int) -> float:
    return float(bits_w * bits_a)


def layer_macs(gm: fx.GraphModule, calls: Mapping[str, Sequence[str]], example: torch.Tensor) -> dict[str, int]:
    """MACs per example of each layer, summed over its call sites (shape propagation).

    ``calls`` maps a layer name to the fx node names of its conv/linear calls;
    the node's second argument is the (quantized) weight. ``example`` has batch 1.
    """
    ShapeProp(gm).propagate(example)
    nodes = {n.name: n for n in gm.graph.nodes}
    out: dict[str, int] = {}
    for name, node_names in calls.items():
        total = 0
        for node_name in node_names:
            node = nodes[node_name]
            out_shape = node.meta["tensor_meta"].shape
            weight_shape = node.args[1].meta["tensor_meta"].shape
            per_output = int(torch.Size(weight_shape[1:]).numel())
            total += int(torch.Size(out_shape[1:]).numel()) * per_output if len(out_shape) > 1 else per_output * int(out_shape[0])
        out[name] = total
    return out


def summarize(
    layers: Sequence[LayerShape],
    bits: Mapping[str, tuple[int, int]],
    mac_cost: MacCost | None = None,
) -> CostSummary:
    """Exact cost of one assignment of (weight, activation) widths to layers."""
    mac_cost = mac_cost or bops_per_mac
    rows = []
    for layer in layers:
        bw, ba = bits[layer.name]
        rows.append(LayerCost(
            name=layer.name, op=layer.op, macs=layer.macs, params=layer.params, bits_w=bw, bits_a=ba,
            bops=layer.macs * bw * ba, cost=layer.macs * mac_cost(bw, ba),
            weight_bytes=layer.params * bw / 8 + BIAS_BYTES * layer.bias_params,
        ))
    macs = sum(r.macs for r in rows)
    bops = sum(r.bops for r in rows)
    fp32 = macs * FLOAT_BITS * FLOAT_BITS
    return CostSummary(
        layers=tuple(rows), macs=macs, params=sum(r.params for r in rows), bops=bops, bops_fp32=fp32,
        rel_bops=100.0 * bops / fp32 if fp32 else 0.0,
        weight_bytes=sum(r.weight_bytes for r in rows), cost=sum(r.cost for r in rows),
    )


def extreme_cost(
    layers: Sequence[LayerShape],
    allowed: Mapping[str, tuple[Sequence[int], Sequence[int]]],
    mac_cost: MacCost | None = None,
    lowest: bool = True,
) -> CostSummary:
    """Cost with every tensor at its narrowest (``lowest``) or widest allowed width.

    The narrowest point is the minimum of BOPs and bytes (both grow with every
    width), and of a cost table that does not reward wider widths (profiles
    validate that), so it decides feasibility.
    """
    pick = min if lowest else max
    bits = {layer.name: (pick(allowed[layer.name][0]), pick(allowed[layer.name][1])) for layer in layers}
    return summarize(layers, bits, mac_cost)
