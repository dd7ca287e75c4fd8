"""The direction rule and the cost model on problems whose answer is known (the finish: test_finish.py)."""

from __future__ import annotations

import pytest
import torch

from cgmq_cli import cgmq
from cgmq_cli.cost import Budget
from two_layers import prepared


def test_unit_vector_and_direction() -> None:
    assert torch.equal(cgmq.unit(torch.zeros(3)), torch.zeros(3))
    assert torch.allclose(cgmq.unit(torch.tensor([3.0, 4.0])), torch.tensor([0.6, 0.8]))
    step = cgmq.direction(torch.tensor([1.0, 0.0]), [torch.tensor([0.0, 2.0])], r=1.5)
    assert torch.allclose(step, torch.tensor([1.0, 1.5]))
    # met budgets: only the loss direction remains
    assert torch.allclose(cgmq.direction(torch.tensor([0.0, -2.0]), [], r=1.5), torch.tensor([0.0, -1.0]))


def test_costly_layer_loses_bits_first() -> None:
    qm = prepared()
    tensors = cgmq.free_tensors(qm)
    costs = cgmq.CostModel(qm.shapes, Budget(rel_bops=5.0), None)
    for step in range(100):  # no loss signal: the cost term alone moves the gates
        for t in tensors:
            t.quantizer.gate.grad = torch.tensor(0.0)
        cgmq.gate_step(tensors, costs, qm.widths(), eta=0.05, r=1.5)
        if qm.bits()["big"][0] < 32:
            break
    assert qm.bits()["big"] == (16, 8) and step < 20
    assert qm.bits()["small"] == (32, 32)  # the cheap layer has not changed width yet
    big_gate = next(t for t in tensors if t.key == "w_big").quantizer.gate
    small_gate = next(t for t in tensors if t.key == "w_small").quantizer.gate
    assert (5 - float(big_gate)) > 3 * (5 - float(small_gate)) > 0


def test_loss_term_raises_bits_when_budget_met() -> None:
    qm = prepared()
    qm.set_bits({"big": (4, 8), "small": (4, 4)})
    tensors = cgmq.free_tensors(qm)
    costs = cgmq.CostModel(qm.shapes, Budget(rel_bops=100.0), None)
    for _ in range(30):
        for t in tensors:  # more bits lower the loss everywhere
            t.quantizer.gate.grad = torch.tensor(-1.0)
        cgmq.gate_step(tensors, costs, qm.widths(), eta=0.05, r=1.5)
    assert qm.bits()["big"][0] > 4 and all(b > 4 for b in qm.bits()["small"])


def test_weight_bytes_gradient_ignores_activations() -> None:
    qm = prepared()
    tensors = cgmq.free_tensors(qm)
    costs = cgmq.CostModel(qm.shapes, Budget(weight_bytes=1000), None)
    grad = costs.gradient("weight_bytes", tensors, qm.widths())
    for t, g in zip(tensors, grad.tolist()):
        assert (g > 0) if t.quantizer.kind == "weight" else (g == 0)


def test_cost_table_gradient_is_the_slope_to_the_next_width() -> None:
    qm = prepared()
    table = {(bw, ba): bw * ba / 64 + 1.0 for bw in (2, 4, 8, 16, 32) for ba in (2, 4, 8, 16, 32)}
    mac_cost = lambda bw, ba: table[(bw, ba)]  # noqa: E731
    qm.set_bits({"big": (8, 8), "small": (8, 8)})
    tensors = cgmq.free_tensors(qm)
    costs = cgmq.CostModel(qm.shapes, Budget(cost=1.0), mac_cost)
    bits = qm.widths()
    grad = costs.gradient("cost", tensors, bits)
    here = costs.summary(bits).cost
    for t, g in zip(tensors, grad.tolist()):
        up = cgmq._moved(bits, t, t.quantizer.neighbour(+1))
        assert g == pytest.approx(costs.summary(up).cost - here) and g > 0
