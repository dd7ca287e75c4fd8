"""Budgets: upper bounds on a model's cost metrics, validated on construction.

Torch-free, so that hardware profiles (defaults), project settings and flags
(requests) and the cost model share one type. One limit per metric of
:mod:`cgmq_cli.metrics` (unset means unbounded); ``rel_bops`` is in percent
of the float 32x32 BOPs. ``is_satisfied_by`` is the only comparison the rest
of cgmq makes.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from cgmq_cli.errors import UsageError
from cgmq_cli.metrics import KEYS, METRICS

BUDGET_KEYS = KEYS


class BudgetValueError(UsageError):
    """A budget that is not a positive finite number (or above its metric's upper bound)."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        from cgmq_cli.sanitize import short

        super().__init__(f"budget {key} = {short(value)}: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


def _positive(key: str, value: Any) -> float:
    """A positive finite number; numeric strings count (YAML 1.1 reads ``1e8`` as a string)."""
    upper = METRICS[key].upper
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
            or not 0 < number <= upper:
        limit = "" if upper == math.inf else f" and at most {upper:g} ({METRICS[key].unit})"
        raise BudgetValueError(key, value, f"must be a positive finite number{limit}")
    return float(number)


class Budget:
    """Limits per metric key, e.g. ``Budget(rel_bops=1.0, weight_bytes=65536)``; ``budget.bops`` is None when unset."""

    __slots__ = ("_limits",)

    def __init__(self, **limits: Any) -> None:
        unknown = [k for k in limits if k not in METRICS]
        if unknown:
            raise UsageError(f"unknown budget `{unknown[0]}`", f"budgets: {', '.join(METRICS)}")
        checked = {k: _positive(k, v) for k, v in limits.items() if v is not None}
        object.__setattr__(self, "_limits", {k: checked[k] for k in METRICS if k in checked})

    def __getattr__(self, key: str) -> float | None:
        if key in METRICS:
            return self._limits.get(key)
        raise AttributeError(key)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("Budget is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Budget) and self._limits == other._limits

    def __hash__(self) -> int:
        return hash(tuple(self._limits.items()))

    def __repr__(self) -> str:
        return "Budget(" + ", ".join(f"{k}={v!r}" for k, v in self._limits.items()) + ")"

    def __reduce__(self) -> tuple:
        return (_rebuild, (dict(self._limits),))

    def limits(self) -> dict[str, float]:
        return dict(self._limits)

    def violations(self, summary: Any) -> dict[str, float]:
        """Budget name -> relative excess (value / limit - 1) for every violated budget.

        ``summary`` is anything with ``as_dict()`` giving the cost under the same keys.
        """
        values = summary.as_dict()
        return {k: values[k] / lim - 1.0 for k, lim in self._limits.items() if values[k] > lim}

    def is_satisfied_by(self, summary: Any) -> bool:
        return not self.violations(summary)

    def as_dict(self) -> dict:
        return {k: self._limits.get(k) for k in METRICS}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Budget":
        return cls(**{k: v for k, v in values.items() if k in METRICS})


def _rebuild(limits: dict) -> Budget:
    return Budget(**limits)
