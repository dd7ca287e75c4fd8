"""A new cost metric is one registry entry: budgets, the cost model, the rule, the finish and compress use it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cgmq_cli import cgmq, finish, metrics, qmodel
from cgmq_cli.cost import Budget, summarize

# A measured latency per MAC (nanoseconds) at each (b_w, b_a): 2 and 4 bits run on the same kernel (a tie).
LATENCY_NS = {(bw, ba): (1.0 if max(bw, ba) <= 4 else 2.0 if max(bw, ba) <= 8 else 6.0)
              for bw in (2, 4, 8, 16, 32) for ba in (2, 4, 8, 16, 32)}


def _latency_ms(row: metrics.Row, ctx: metrics.Context) -> float:
    return row.macs * LATENCY_NS[(row.bits_w, row.bits_a)] * 1e-6


LATENCY = metrics.Metric("latency_ms", "--budget-latency-ms", "ms", "sum of MACs x measured latency per MAC + 0.05 ms",
                         _latency_ms, constant=lambda ctx: 0.05)
START_MS = 0.05 + (64 * 256 * 6.0 + 256 * 4 * 6.0) * 1e-6  # 32-bit weights and hidden input, 8-bit network input


@pytest.fixture
def latency(monkeypatch: pytest.MonkeyPatch) -> metrics.Metric:
    monkeypatch.setitem(metrics.METRICS, LATENCY.key, LATENCY)
    return LATENCY


def _prepared() -> qmodel.QuantizedModel:
    torch.manual_seed(0)
    qm = qmodel.prepare(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4)), (64,), input_bits=8)
    qm.calibrate(torch.randn(32, 64))
    return qm


def test_budget_and_cost_read_the_new_entry(latency) -> None:
    qm = _prepared()
    budget = Budget(latency_ms=0.1)
    assert budget.latency_ms == 0.1 and budget.as_dict()["latency_ms"] == 0.1
    summary = summarize(qm.shapes, qm.widths())
    assert summary.as_dict()["latency_ms"] == pytest.approx(START_MS)
    assert not budget.is_satisfied_by(summary)


def test_rule_and_finish_meet_a_budget_on_the_new_metric(latency) -> None:
    qm = _prepared()
    tensors = cgmq.free_tensors(qm)
    costs = cgmq.CostModel(qm.shapes, Budget(latency_ms=0.1), None)  # the minimum is 0.0838 ms
    grad = costs.gradient("latency_ms", tensors, qm.widths())  # finite slopes (no formula in b)
    assert grad.shape == (len(tensors),) and float(grad.max()) > 0
    for _ in range(40):  # the cost term alone moves the gates down
        cgmq.gate_step(tensors, costs, qm.widths(), eta=0.05, r=1.5, loss_grads=[0.0] * len(tensors))
    assert costs.values(qm.widths())["latency_ms"] < START_MS
    widths = qm.widths()
    pred = {t.key: {w: float(t.quantizer.allowed.index(widths[t.key]) - i) for i, w in enumerate(t.quantizer.allowed)}
            for t in tensors}
    bits, _ = finish.repair(tensors, costs, widths, pred)
    bits, _ = finish.fill(tensors, costs, bits, {k: {w: -v for w, v in p.items()} for k, p in pred.items()})
    assert not costs.violated(bits)


def test_compress_meets_and_reports_the_new_metric(latency, digits_ckpt: str, tmp_path: Path) -> None:
    from cgmq_cli import compress as cmp
    from cgmq_cli.trainer import TrainConfig

    settings = cmp.CompressSettings(model=digits_ckpt, arch="cgmq_cli.models:DigitsCNN", data="digits",
                                    out=str(tmp_path / "run"), budget=Budget(latency_ms=0.6), batch_size=32,
                                    subset=128, train=TrainConfig(epochs=1, gate_steps=5))
    report = cmp.compress(settings).report
    assert report["feasible"] and report["cost"]["latency_ms"] <= 0.6 and report["budget"]["latency_ms"] == 0.6
    assert all("latency_ms" in (e["cost_up"] or e["cost_down"] or {"latency_ms": 0}) for e in report["tensors"])
