"""Cost model: the exact cost of one assignment of widths to quantizers.

A layer call reads two quantizers, its weight's (``weight_key``) and its
input's (``act_key``; tensors read by several layers share one), so a width
maps to cost through every call that reads it::

    MAC_l   = output elements per example x (Cin / groups) x kernel size      (conv)
            = output elements per example x in_features                       (linear)
    BOPs    = sum_l MAC_l * b_w,l * b_a,l
    rel     = 100 * BOPs / sum_l (MAC_l * 32 * 32)        (percent)
    bytes   = sum_l params_l * b_w,l / 8  +  4 * bias_params_l   (float biases)

The formulas of every metric (and their gradients) live in
:mod:`cgmq_cli.metrics`; this module evaluates them. With a cost table (a
hardware profile's cycles or energy per MAC at each (b_w, b_a)),
``cost = sum_l MAC_l * table[b_w, b_a]``; without one the cost is the BOPs.
Cost knows nothing of training: it maps widths to numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from cgmq_cli.budget import Budget  # noqa: F401 - re-exported: budgets are compared with CostSummary
from cgmq_cli.metrics import FLOAT_BITS, METRICS, Context, MacCost, Row

Widths = Mapping[str, int]  # quantizer key -> width


@dataclass(frozen=True)
class LayerShape:
    """What the cost model needs to know of one quantized layer call."""

    name: str
    op: str
    macs: int
    params: int
    bias_params: int = 0
    weight_key: str | None = None  # quantizer of the weight (or the right operand); None: float
    act_key: str | None = None  # quantizer of the input (or the left operand); None: float

    def bits(self, widths: Widths) -> tuple[int, int]:
        return (widths[self.weight_key] if self.weight_key else FLOAT_BITS,
                widths[self.act_key] if self.act_key else FLOAT_BITS)

    def row(self, widths: Widths) -> Row:
        bw, ba = self.bits(widths)
        return Row(self.macs, self.params, self.bias_params, bw, ba)


@dataclass(frozen=True)
class Extras:
    """What no width changes: compute left in float, parameters kept in float (see graph/coverage.py)."""

    float_macs: int = 0
    float_params: int = 0


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
    macs: int  # of the whole model: quantized layers + float compute
    params: int
    bops_fp32: int
    values: dict = field(default_factory=dict)  # metric key -> total
    float_macs: int = 0
    float_params: int = 0

    @property
    def quantized_macs(self) -> int:
        return self.macs - self.float_macs

    @property
    def coverage(self) -> float:
        """Percent of the model's MACs that run in quantized layers."""
        return 100.0 * self.quantized_macs / self.macs if self.macs else 100.0

    def __getattr__(self, key: str) -> Any:
        values = self.__dict__.get("values", {})
        if key in values:
            return values[key]
        raise AttributeError(key)

    def as_dict(self) -> dict:
        return {**{k: self.values[k] for k in METRICS if k in self.values}, "macs": self.macs,
                "bops_fp32": self.bops_fp32, "quantized_macs": self.quantized_macs, "float_macs": self.float_macs,
                "float_params": self.float_params, "coverage": self.coverage}


def context(layers: Sequence[LayerShape], mac_cost: MacCost | None = None, extras: Extras = Extras()) -> Context:
    return Context(macs=sum(layer.macs for layer in layers), float_macs=extras.float_macs,
                   float_params=extras.float_params, mac_cost=mac_cost)


def summarize(layers: Sequence[LayerShape], widths: Widths, mac_cost: MacCost | None = None,
              extras: Extras = Extras()) -> CostSummary:
    """Exact cost of one assignment of widths to quantizers (plus what stays float, ``extras``)."""
    ctx = context(layers, mac_cost, extras)
    rows = [layer.row(widths) for layer in layers]
    per_layer = [LayerCost(
        name=layer.name, op=layer.op, macs=layer.macs, params=layer.params, bits_w=r.bits_w, bits_a=r.bits_a,
        bops=int(METRICS["bops"].layer(r, ctx)), cost=METRICS["cost"].layer(r, ctx),
        weight_bytes=METRICS["weight_bytes"].layer(r, ctx)) for layer, r in zip(layers, rows)]
    values = {key: metric.total(rows, ctx) for key, metric in METRICS.items()}
    values["bops"] = int(values["bops"])
    return CostSummary(layers=tuple(per_layer), macs=ctx.macs + ctx.float_macs,
                       params=sum(layer.params for layer in layers), bops_fp32=ctx.bops_fp32, values=values,
                       float_macs=ctx.float_macs, float_params=ctx.float_params)


def extreme_cost(
    layers: Sequence[LayerShape],
    allowed: Mapping[str, Sequence[int]],
    mac_cost: MacCost | None = None,
    lowest: bool = True,
    extras: Extras = Extras(),
) -> CostSummary:
    """Cost with every quantizer at its narrowest (``lowest``) or widest allowed width.

    The narrowest point is the minimum of BOPs and bytes (both grow with every
    width), and of a cost table that does not reward wider widths (profiles
    validate that), so it decides feasibility.
    """
    pick = min if lowest else max
    return summarize(layers, {key: pick(widths) for key, widths in allowed.items()}, mac_cost, extras)
