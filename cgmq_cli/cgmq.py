"""The CGMQ direction rule and the discrete finish that makes every gate epoch end feasible.

Gate step (CGGD's rule with both terms normalised; ``G = dL/dg``, ``d_k = dC_k/dg``)::

    every budget met:      g <- g - eta * G^
    some budget violated:  g <- g - eta * (G^ + R * sum_{k violated} d^_k)

``x^ = x / ||x||`` (zero for a zero vector). ``eta`` is a step in log2-width
units, ``R > 1`` makes the cost term outweigh the loss term while a budget is
violated. Finish after a gate epoch (discrete, deterministic, terminates):

* repair: while a budget is violated, halve the width whose predicted loss
  increase per unit of (normalised) cost saved is smallest;
* fill: while a tensor can double its width within every budget, double the
  one with the largest predicted loss decrease per unit of cost added.

The predictions are the first-order probes ``<dL/dQ, Q_down - Q_b>`` and
``<dL/dQ, Q_up - Q_b>`` that the quantizers deliver in probe mode. This module
knows no files, YAML, Rich or ONNX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from cgmq_cli import metrics
from cgmq_cli.cost import Budget, CostSummary, Extras, LayerShape, MacCost, context, summarize
from cgmq_cli.quant.modules import GatedQuantizer

Widths = dict[str, int]  # quantizer key -> width


@dataclass(frozen=True)
class Tensor:
    """One free gate: the quantizer's key, the quantizer, and what it quantizes (for messages)."""

    key: str
    quantizer: GatedQuantizer
    label: str = ""


def free_tensors(qm) -> list[Tensor]:
    """Every quantizer of a prepared model with more than one allowed width, in insertion order."""
    return [Tensor(key, q, qm.tensors[key].label) for key, q in qm.tensor_quantizers().items() if len(q.allowed) > 1]


def unit(v: torch.Tensor) -> torch.Tensor:
    n = torch.linalg.vector_norm(v)
    return v / n if n > 0 else torch.zeros_like(v)


def direction(loss_grad: torch.Tensor, cost_grads: list[torch.Tensor], r: float) -> torch.Tensor:
    """The descent direction of the rule: ``G^ + R * sum d^_k`` (violated budgets only)."""
    step = unit(loss_grad)
    for d in cost_grads:
        step = step + r * unit(d)
    return step


def _moved(widths: Widths, t: Tensor, width: int) -> Widths:
    return {**widths, t.key: width}


class CostModel:
    """Exact costs of width assignments and the cost gradients w.r.t. the gates (from :mod:`cgmq_cli.metrics`)."""

    def __init__(self, shapes: list[LayerShape], budget: Budget, mac_cost: MacCost | None,
                 extras: Extras = Extras()) -> None:
        self.shapes = shapes
        self.budget = budget
        self.mac_cost = mac_cost
        self.extras = extras
        self.ctx = context(shapes, mac_cost, extras)
        self.uses: dict[str, list[tuple[LayerShape, int]]] = {}
        for s in shapes:
            for side, key in enumerate((s.weight_key, s.act_key)):
                if key is not None:
                    self.uses.setdefault(key, []).append((s, side))

    def summary(self, widths: Widths) -> CostSummary:
        return summarize(self.shapes, widths, self.mac_cost, self.extras)

    def violated(self, widths: Widths) -> dict[str, float]:
        return self.budget.violations(self.summary(widths))

    def gradient(self, name: str, tensors: list[Tensor], widths: Widths) -> torch.Tensor:
        """dC/dg of one budget's metric for every tensor: summed over the layer calls its width enters."""
        metric = metrics.METRICS[name]
        out = []
        for t in tensors:
            up, down = t.quantizer.neighbour(+1), t.quantizer.neighbour(-1)
            out.append(sum(metric.gradient(s.row(widths), side, self.ctx, up, down) for s, side in self.uses.get(t.key, ())))
        return torch.tensor(out, dtype=torch.float64)

    def load(self, widths: Widths) -> float:
        """The largest budget use as a fraction of its limit (> 1 means violated)."""
        values = self.summary(widths).as_dict()
        return max((values[n] / lim for n, lim in self.budget.limits().items()), default=0.0)

    def share(self, before: Widths, after: Widths) -> float:
        """Cost change between two assignments, summed over budgets as fractions of each limit."""
        a, b = self.summary(before).as_dict(), self.summary(after).as_dict()
        return sum(abs(b[n] - a[n]) / lim for n, lim in self.budget.limits().items())


def gate_step(tensors: list[Tensor], costs: CostModel, bits: Widths, eta: float, r: float,
              loss_grads: Sequence[float] | None = None) -> dict[str, float]:
    """Apply one step of the rule to the gates; returns the violated budgets it acted on.

    ``loss_grads`` are dL/dg per tensor (default: the gates' ``.grad``).
    """
    if loss_grads is None:
        loss_grads = [float(t.quantizer.gate.grad or 0.0) for t in tensors]
    grads = torch.tensor(list(loss_grads), dtype=torch.float64)
    violated = costs.violated(bits)
    cost_grads = [costs.gradient(name, tensors, bits) for name in violated]
    _descend(tensors, direction(grads, cost_grads, r), eta)
    return violated


def _descend(tensors: list[Tensor], step: torch.Tensor, eta: float) -> None:
    """g <- g - eta * step for every free gate, kept inside its allowed range."""
    with torch.no_grad():
        for t, s in zip(tensors, step.tolist()):
            t.quantizer.gate.sub_(eta * s)
            t.quantizer.clamp_gate()


Probe = Mapping[GatedQuantizer, tuple[float, float]]  # quantizer -> (dL if doubled, dL if halved)


@dataclass(frozen=True)
class Move:
    tensor: str  # quantizer key
    label: str  # what it quantizes
    old: int
    new: int
    predicted_dloss: float


def repair(tensors: list[Tensor], costs: CostModel, bits: Widths, probe: Callable[[], Probe]) -> tuple[Widths, list[Move]]:
    """Halve widths until every budget holds, cheapest predicted loss per cost saved first."""
    moves: list[Move] = []
    while costs.violated(bits):
        estimates = probe()
        best = None
        for t in tensors:
            down = t.quantizer.neighbour(-1)
            if down is None:
                continue
            after = _moved(bits, t, down)
            saved = costs.share(bits, after)
            if saved <= 0:
                continue
            score = estimates[t.quantizer][1] / saved
            if best is None or score < best[0]:
                best = (score, t, down, after)
        if best is None:  # every tensor at its minimum: feasible by the pre-check, so unreachable
            raise RuntimeError("repair found no width to lower although a budget is violated")
        _, t, down, after = best
        moves.append(Move(t.key, t.label, t.quantizer.bits, down, estimates[t.quantizer][1]))
        t.quantizer.set_bits(down)
        bits = after
    return bits, moves


def fill(tensors: list[Tensor], costs: CostModel, bits: Widths, probe: Callable[[], Probe]) -> tuple[Widths, list[Move]]:
    """Double widths while every budget still holds, largest predicted loss decrease per cost first."""
    moves: list[Move] = []
    while True:
        estimates = probe()
        best = None
        for t in tensors:
            up = t.quantizer.neighbour(+1)
            if up is None:
                continue
            after = _moved(bits, t, up)
            if costs.violated(after):
                continue
            added = costs.share(bits, after)
            score = -estimates[t.quantizer][0] / added if added > 0 else math.inf
            if best is None or score > best[0]:
                best = (score, t, up, after)
        if best is None:
            return bits, moves
        _, t, up, after = best
        moves.append(Move(t.key, t.label, t.quantizer.bits, up, estimates[t.quantizer][0]))
        t.quantizer.set_bits(up)
        bits = after


def constraint_repair(tensors: list[Tensor], costs: CostModel, bits_of: Callable[[], Widths], eta: float) -> Widths:
    """Plain CGGD finish: step along the cost directions only until every budget holds."""
    bits = bits_of()
    while violated := costs.violated(bits):
        _descend(tensors, sum(unit(costs.gradient(name, tensors, bits)) for name in violated), eta)
        new = bits_of()
        if new == bits and all(t.quantizer.neighbour(-1) is None for t in tensors):
            raise RuntimeError("constraint repair is stuck at the minimum widths")
        bits = new
    return bits
