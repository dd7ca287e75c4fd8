"""Cost metrics: the one registry that holds each metric's budget key, formula and gate gradient.

A metric sums a contribution per layer call (``Row``: MACs, weight elements,
the two operand widths) plus a constant that no width changes (float compute
left out of the quantized model, parameters that stay float), optionally
scaled (relative BOPs). Its gradient with respect to one gate is the change of
the layer terms the gate's tensor enters:

* BOPs-like metrics relax ``b = 2^g``: ``d(MAC * b_w * b_a)/dg = ln2 * MAC * b_w * b_a``;
* a cost table has no formula in ``b``: the slope is the secant to the nearest
  allowed width upwards whose cost differs (downwards at the top), per log2
  unit of width. Tied entries are looked past: a tie is no reason for the rule
  to stop pushing a gate whose next step down does save.

Every metric must be non-decreasing in every width (profiles validate cost
tables for this): then the all-narrowest assignment is the cheapest, which the
feasibility check and the finish's termination rely on.

Adding a metric (e.g. latency from a measured table) is one entry in
:data:`METRICS` plus a test; budgets, flags' validation, the direction rule,
repair/fill and the reports pick it up from here. Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

LN2 = math.log(2.0)
FLOAT_BITS = 32
BIAS_BYTES = 4  # biases stay float32
FLOAT_PARAM_BYTES = 4  # a parameter left in float counts at 32 bits

MacCost = Callable[[int, int], float]


@dataclass(frozen=True)
class Row:
    """What a metric sees of one layer call at one assignment of widths."""

    macs: int
    params: int  # quantized weight elements stored for this call (0 at a repeated call site)
    bias_params: int
    bits_w: int  # the weight (or the right operand of an activation x activation product)
    bits_a: int  # the input activation (the left operand)


@dataclass(frozen=True)
class Context:
    """Terms of a model that no width changes."""

    macs: int  # MACs of the quantized layers
    float_macs: int = 0  # MACs left in float (counted at 32 x 32)
    float_params: int = 0  # parameters that stay float (counted at 32 bits)
    mac_cost: MacCost | None = None

    @property
    def bops_fp32(self) -> int:
        return (self.macs + self.float_macs) * FLOAT_BITS * FLOAT_BITS


@dataclass(frozen=True)
class Metric:
    key: str  # the budget key, and the key in report.json's ``cost``
    flag: str  # the compress flag that sets its budget
    unit: str
    help: str
    layer: Callable[[Row, Context], float]  # one layer call's contribution
    constant: Callable[[Context], float] = lambda ctx: 0.0  # noqa: E731
    scale: Callable[[Context], float] = lambda ctx: 1.0  # noqa: E731
    slope: Callable[[Row, int, Context, Sequence[int], Sequence[int]], float] | None = None
    upper: float = math.inf  # the largest meaningful budget (relative BOPs: 100 percent)

    def total(self, rows: list[Row], ctx: Context) -> float:
        return self.scale(ctx) * (sum(self.layer(r, ctx) for r in rows) + self.constant(ctx))

    def gradient(self, row: Row, side: int, ctx: Context, up: Sequence[int] = (), down: Sequence[int] = ()) -> float:
        """d total / d g of the gate on operand ``side`` (0 weight, 1 input) of ``row``.

        ``up``/``down``: that tensor's wider / narrower allowed widths, nearest first (for finite slopes).
        """
        if self.slope is not None:
            return self.scale(ctx) * self.slope(row, side, ctx, up, down)
        return self.scale(ctx) * _finite_slope(self, row, side, ctx, up, down)


def _moved(row: Row, side: int, bits: int) -> Row:
    return Row(row.macs, row.params, row.bias_params, bits if side == 0 else row.bits_w, bits if side == 1 else row.bits_a)


def _finite_slope(metric: Metric, row: Row, side: int, ctx: Context, up: Sequence[int], down: Sequence[int]) -> float:
    bits = row.bits_w if side == 0 else row.bits_a
    here = metric.layer(row, ctx)
    for other in (*up, *down):  # upwards first; downwards only when no wider width changes the cost
        change = metric.layer(_moved(row, side, other), ctx) - here
        if change != 0:
            return change / math.log2(other / bits)
    return 0.0


def _bops(row: Row, ctx: Context) -> float:
    return float(row.macs * row.bits_w * row.bits_a)


def _bops_slope(row: Row, side: int, ctx: Context, up: Sequence[int], down: Sequence[int]) -> float:
    return LN2 * _bops(row, ctx)


def _float_bops(ctx: Context) -> float:
    return float(ctx.float_macs * FLOAT_BITS * FLOAT_BITS)


def _bytes(row: Row, ctx: Context) -> float:
    return row.params * row.bits_w / 8 + BIAS_BYTES * row.bias_params


def _bytes_slope(row: Row, side: int, ctx: Context, up: Sequence[int], down: Sequence[int]) -> float:
    return LN2 * row.params * row.bits_w / 8 if side == 0 else 0.0


def _table(row: Row, ctx: Context) -> float:
    mac_cost = ctx.mac_cost or (lambda bw, ba: float(bw * ba))
    return row.macs * mac_cost(row.bits_w, row.bits_a)


def _float_table(ctx: Context) -> float:
    mac_cost = ctx.mac_cost or (lambda bw, ba: float(bw * ba))
    return ctx.float_macs * mac_cost(FLOAT_BITS, FLOAT_BITS) if ctx.float_macs else 0.0


METRICS: dict[str, Metric] = {m.key: m for m in (
    Metric("bops", "--budget-bops", "BOPs", "sum of MACs x b_w x b_a (float compute at 32 x 32)",
           _bops, constant=_float_bops, slope=_bops_slope),
    Metric("rel_bops", "--budget-rel-bops", "%", "BOPs in percent of the float 32 x 32 BOPs",
           _bops, constant=_float_bops, scale=lambda ctx: 100.0 / ctx.bops_fp32 if ctx.bops_fp32 else 0.0,
           slope=_bops_slope, upper=100.0),
    Metric("weight_bytes", "--budget-weight-bytes", "bytes",
           "weights x b_w / 8 + 4 bytes per bias element and per parameter left in float",
           _bytes, constant=lambda ctx: float(FLOAT_PARAM_BYTES * ctx.float_params), slope=_bytes_slope),
    Metric("cost", "--budget-cost", "table", "sum of MACs x table[b_w, b_a] of the profile's cost table",
           _table, constant=_float_table),
)}
KEYS: tuple[str, ...] = tuple(METRICS)
