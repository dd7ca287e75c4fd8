"""CI checks on a finished run: budgets, accuracy floor, accuracy drop.

Each check is one result with a one-line rendering; ``cgmq check`` exits 0
only when all of them hold (exit 4 otherwise).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    value: float
    limit: float
    relation: str  # "<=" or ">="

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.value:,.6g} {self.relation} {self.limit:,.6g}"

    def as_dict(self) -> dict:
        return asdict(self)


def _at_most(name: str, value: float, limit: float) -> CheckResult:
    return CheckResult(name, value <= limit, value, limit, "<=")


def run_checks(report: dict, max_bops: float | None = None, max_rel_bops: float | None = None,
               max_weight_bytes: float | None = None, min_accuracy: float | None = None,
               max_accuracy_drop: float | None = None, min_coverage: float | None = None) -> list[CheckResult]:
    """The run's own budgets always, plus every threshold given.

    ``min_coverage``: the percent of the model's MACs that run in quantized layers (runs from before
    cgmq counted float compute have 100: they only knew quantized layers).
    """
    cost, acc = report["cost"], report["accuracy"]
    results = [_at_most(f"budget {name}", cost[name], limit) for name, limit in report["budget"].items() if limit is not None]
    for name, limit in (("bops", max_bops), ("rel_bops", max_rel_bops), ("weight_bytes", max_weight_bytes)):
        if limit is not None:
            results.append(_at_most(f"max {name}", cost[name], limit))
    if min_accuracy is not None:
        results.append(CheckResult("min accuracy", acc["quantized"] >= min_accuracy, acc["quantized"], min_accuracy, ">="))
    if max_accuracy_drop is not None:
        results.append(_at_most("accuracy drop", acc["float"] - acc["quantized"], max_accuracy_drop))
    if min_coverage is not None:
        covered = cost.get("coverage", 100.0)
        results.append(CheckResult("min coverage", covered >= min_coverage, covered, min_coverage, ">="))
    return results
