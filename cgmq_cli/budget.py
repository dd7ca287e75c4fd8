"""Budgets: upper bounds on a model's cost, validated on construction.

Torch-free, so that hardware profiles (defaults), project settings and flags
(requests) and the cost model share one type. ``None`` means unbounded;
``rel_bops`` is in percent of the float 32x32 BOPs. ``is_satisfied_by`` is the
only comparison the rest of cgmq makes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from cgmq_cli.errors import UsageError

BUDGET_KEYS = ("bops", "rel_bops", "weight_bytes", "cost")


class BudgetValueError(UsageError):
    """A budget that is not a positive finite number (or a relative budget above 100 %)."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        from cgmq_cli.sanitize import short

        super().__init__(f"budget {key} = {short(value)}: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


def _positive(key: str, value: Any) -> float:
    """A positive finite number; numeric strings count (YAML 1.1 reads ``1e8`` as a string)."""
    upper = 100.0 if key == "rel_bops" else math.inf
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
            or not 0 < number <= upper:
        limit = "" if upper == math.inf else f" and at most {upper:g} (percent)"
        raise BudgetValueError(key, value, f"must be a positive finite number{limit}")
    return float(number)


@dataclass(frozen=True)
class Budget:
    bops: float | None = None
    rel_bops: float | None = None
    weight_bytes: float | None = None
    cost: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                object.__setattr__(self, f.name, _positive(f.name, value))

    def limits(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in BUDGET_KEYS if getattr(self, k) is not None}

    def violations(self, summary: Any) -> dict[str, float]:
        """Budget name -> relative excess (value / limit - 1) for every violated budget.

        ``summary`` is anything with ``as_dict()`` giving the cost under the same keys.
        """
        values = summary.as_dict()
        return {k: values[k] / lim - 1.0 for k, lim in self.limits().items() if values[k] > lim}

    def is_satisfied_by(self, summary: Any) -> bool:
        return not self.violations(summary)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in BUDGET_KEYS}
