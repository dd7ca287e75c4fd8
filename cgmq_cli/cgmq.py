"""The CGMQ direction rule and the discrete finish that makes every gate epoch end feasible.

Gate step (CGGD's rule with both terms normalised; ``G = dL/dg``, ``d_k = dC_k/dg``)::

    every budget met:      g <- g - eta * G^
    some budget violated:  g <- g - eta * (G^ + R * sum_{k violated} d^_k)

``x^ = x / ||x||`` (zero for a zero vector). ``eta`` is a step in log2-width
units, ``R > 1`` makes the cost term outweigh the loss term while a budget is
violated. The discrete finish that makes every gate epoch end within budget
lives in :mod:`cgmq_cli.finish`; both use :class:`CostModel`, which reads every
formula and gradient from :mod:`cgmq_cli.metrics`. This module knows no files,
YAML, Rich or ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

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
        self._memo: dict[tuple, _Values] = {}

    def summary(self, widths: Widths) -> CostSummary:
        return summarize(self.shapes, widths, self.mac_cost, self.extras)

    def values(self, widths: Widths) -> "_Values":
        """Every metric's total at ``widths`` (metric key -> value), memoised: the finish scores many candidates."""
        key = tuple(sorted(widths.items()))
        found = self._memo.get(key)
        if found is None:
            if len(self._memo) > 4096:
                self._memo.clear()
            values = self.summary(widths).as_dict()
            found = self._memo[key] = _Values({k: values[k] for k in metrics.METRICS})
        return found

    def violated(self, widths: Widths) -> dict[str, float]:
        return self.budget.violations(self.values(widths))

    def gradient(self, name: str, tensors: list[Tensor], widths: Widths) -> torch.Tensor:
        """dC/dg of one budget's metric for every tensor: summed over the layer calls its width enters."""
        metric = metrics.METRICS[name]
        out = []
        for t in tensors:
            allowed, here = t.quantizer.allowed, widths[t.key]
            up, down = [w for w in allowed if w > here], [w for w in reversed(allowed) if w < here]
            out.append(sum(metric.gradient(s.row(widths), side, self.ctx, up, down) for s, side in self.uses.get(t.key, ())))
        return torch.tensor(out, dtype=torch.float64)

    def saving(self, before: Widths, after: Widths, keys: Iterable[str]) -> float:
        """Cost saved by going from ``before`` to ``after`` in the budgets ``keys``, as fractions of their limits."""
        a, b, limits = self.values(before), self.values(after), self.budget.limits()
        return sum((a[k] - b[k]) / limits[k] for k in keys)

    def load(self, widths: Widths) -> float:
        """The largest budget use as a fraction of its limit (> 1 means violated)."""
        values = self.values(widths)
        return max((values[n] / lim for n, lim in self.budget.limits().items()), default=0.0)

    def share(self, before: Widths, after: Widths) -> float:
        """Cost change between two assignments, summed over budgets as fractions of each limit."""
        a, b = self.values(before), self.values(after)
        return sum(abs(b[n] - a[n]) / lim for n, lim in self.budget.limits().items())


class _Values(dict):
    """Metric totals in the shape :meth:`Budget.violations` compares (``as_dict``)."""

    def as_dict(self) -> dict:
        return self


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
    descend(tensors, direction(grads, cost_grads, r), eta)
    return violated


def descend(tensors: list[Tensor], step: torch.Tensor, eta: float) -> None:
    """g <- g - eta * step for every free gate, kept inside its allowed range."""
    with torch.no_grad():
        for t, s in zip(tensors, step.tolist()):
            t.quantizer.gate.sub_(eta * s)
            t.quantizer.clamp_gate()
