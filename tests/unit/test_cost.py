"""Cost model (cgmq_cli.cost): MACs by shape propagation, BOPs, relative BOPs, bytes, budgets.

Every number is worked out by hand in the test, never taken from the code under test.
"""

from __future__ import annotations

import pytest
from torch import nn

from cgmq_cli import cost, qmodel
from cgmq_cli.models import LeNet5


def _shapes(model: nn.Module, sample_shape) -> dict[str, cost.LayerShape]:
    return {s.name: s for s in qmodel.prepare(model, sample_shape).shapes}


# -------------------------------------------------------------------- MACs ---


def test_one_conv_macs_params_bias() -> None:
    (layer,) = _shapes(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), (3, 10, 10)).values()
    assert (layer.name, layer.op) == ("0", "conv2d")
    assert layer.macs == 10 * 10 * 8 * 3 * 3 * 3 == 21600
    assert layer.params == 8 * 3 * 3 * 3 == 216
    assert layer.bias_params == 8


def test_one_linear_macs_and_no_bias() -> None:
    (layer,) = _shapes(nn.Sequential(nn.Linear(20, 5, bias=False)), (20,)).values()
    assert (layer.op, layer.macs, layer.params, layer.bias_params) == ("linear", 100, 100, 0)
    # a linear over a sequence: every position costs in_features * out_features
    (layer,) = _shapes(nn.Sequential(nn.Linear(20, 5)), (7, 20)).values()
    assert (layer.macs, layer.bias_params) == (7 * 5 * 20, 5)


def test_grouped_and_depthwise_conv() -> None:
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1, groups=4),  # 16 out x 100 px x (8/4) x 9
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise: 16 x 100 x 1 x 9
        nn.Conv2d(16, 4, 1),  # pointwise: 4 x 100 x 16
    )
    shapes = _shapes(model, (8, 10, 10))
    assert shapes["0"].op == "conv2d" and shapes["0"].macs == 16 * 100 * 2 * 9 == 28800
    assert shapes["0"].params == 16 * 2 * 9
    assert shapes["1"].op == "depthwise" and shapes["1"].macs == 16 * 100 * 9 == 14400
    assert shapes["1"].params == 16 * 9
    assert shapes["2"].op == "conv2d" and shapes["2"].macs == 4 * 100 * 16 == 6400


def test_conv1d_macs() -> None:
    (layer,) = _shapes(nn.Sequential(nn.Conv1d(4, 6, 5)), (4, 20)).values()
    # output length 20 - 5 + 1 = 16
    assert (layer.op, layer.macs, layer.params) == ("conv1d", 6 * 16 * 4 * 5, 6 * 4 * 5)


def test_strided_and_dilated_conv() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, dilation=2))
    shapes = _shapes(model, (3, 10, 10))
    assert shapes["0"].macs == 8 * 5 * 5 * 27 == 5400  # 10x10 -> 5x5
    assert shapes["1"].macs == 8 * 1 * 1 * 72  # 5x5, effective kernel 5 -> 1x1


def test_lenet5_reference_numbers() -> None:
    qm = qmodel.prepare(LeNet5(), (1, 28, 28))
    assert [s.macs for s in qm.shapes] == [460800, 3276800, 524288, 5120]
    assert sum(s.macs for s in qm.shapes) == 4267008
    assert [s.name for s in qm.shapes][0] == "features.0"
    assert qm.layers[0].takes_network_input
    assert qm.cost().bops_fp32 == 4267008 * 1024
    assert qm.cost().bops_fp32 == pytest.approx(4.369e9, rel=1e-3)
    for bits, rel in ((8, 6.25), (4, 1.731), (2, 0.517)):
        widths = {name: (bits, bits) for name in qm.bits()}
        widths["features.0"] = (bits, 8)  # the network input stays 8-bit
        qm.set_bits(widths)
        summary = qm.cost()
        assert round(summary.rel_bops, 3) == rel
        first = 460800 * bits * 8
        rest = (3276800 + 524288 + 5120) * bits * bits
        assert summary.bops == first + rest


# ------------------------------------------------------ BOPs, bytes, extremes ---

CONV = cost.LayerShape("conv", "conv2d", macs=21600, params=216, bias_params=8, weight_key="conv.w", act_key="conv.a")
FC = cost.LayerShape("fc", "linear", macs=100, params=100, bias_params=0, weight_key="fc.w", act_key="fc.a")


def _w(**pairs: tuple[int, int]) -> dict[str, int]:
    """Per-layer (weight, input) widths as the cost model's quantizer widths."""
    return {f"{name}.{side}": bits for name, pair in pairs.items() for side, bits in zip("wa", pair)}


def test_summarize_bops_rel_bytes() -> None:
    s = cost.summarize([CONV, FC], _w(conv=(4, 8), fc=(2, 16)))
    conv, fc = s.layers
    assert conv.bops == 21600 * 32 and fc.bops == 100 * 32
    assert s.bops == 21600 * 32 + 3200
    assert s.macs == 21700 and s.params == 316
    assert s.bops_fp32 == 21700 * 1024
    assert s.rel_bops == pytest.approx(100 * (21600 * 32 + 3200) / (21700 * 1024))
    assert conv.weight_bytes == 216 * 4 / 8 + 4 * 8 == 140
    assert fc.weight_bytes == 100 * 2 / 8 == 25
    assert s.weight_bytes == 165
    assert s.cost == s.bops  # without a cost table the cost is the BOPs
    assert s.as_dict()["rel_bops"] == s.rel_bops
    full = cost.summarize([CONV, FC], _w(conv=(32, 32), fc=(32, 32)))
    assert full.rel_bops == 100.0 and full.weight_bytes == 316 * 4 + 32


def test_summarize_with_cost_table() -> None:
    table = {(4, 8): 0.5, (2, 16): 3.0}
    s = cost.summarize([CONV, FC], _w(conv=(4, 8), fc=(2, 16)), lambda bw, ba: table[(bw, ba)])
    assert s.cost == 21600 * 0.5 + 100 * 3.0
    assert s.bops == 21600 * 32 + 3200  # BOPs unchanged


def test_extreme_cost() -> None:
    allowed = {"conv.w": (2, 4, 8), "conv.a": (8, 16), "fc.w": (4, 32), "fc.a": (2, 4)}
    lo = cost.extreme_cost([CONV, FC], allowed, lowest=True)
    hi = cost.extreme_cost([CONV, FC], allowed, lowest=False)
    assert [(l.bits_w, l.bits_a) for l in lo.layers] == [(2, 8), (4, 2)]
    assert [(l.bits_w, l.bits_a) for l in hi.layers] == [(8, 16), (32, 4)]
    assert lo.bops == 21600 * 16 + 100 * 8
    assert hi.bops == 21600 * 128 + 100 * 128
    assert lo.weight_bytes == 216 * 2 / 8 + 32 + 100 * 4 / 8
    assert lo.bops < hi.bops


def test_shared_input_sets_the_cost_of_every_reader() -> None:
    """Two layers reading one tensor share its quantizer: its width enters both BOPs terms."""
    a = cost.LayerShape("a", "conv2d", macs=1000, params=10, weight_key="a.w", act_key="x")
    b = cost.LayerShape("b", "conv2d", macs=300, params=10, weight_key="b.w", act_key="x")
    s = cost.summarize([a, b], {"a.w": 4, "b.w": 8, "x": 2})
    assert [(l.bits_w, l.bits_a) for l in s.layers] == [(4, 2), (8, 2)]
    assert s.bops == 1000 * 4 * 2 + 300 * 8 * 2


def test_budget_violations_and_satisfaction() -> None:
    s = cost.summarize([CONV, FC], _w(conv=(4, 8), fc=(2, 16)))  # bops 694400, bytes 165
    assert cost.Budget().is_satisfied_by(s) and cost.Budget().violations(s) == {}
    assert cost.Budget(bops=694400).is_satisfied_by(s)  # the limit itself is allowed
    over = cost.Budget(bops=694399, weight_bytes=200)
    assert not over.is_satisfied_by(s)
    assert over.violations(s) == {"bops": pytest.approx(694400 / 694399 - 1)}
    both = cost.Budget(bops=347200, weight_bytes=110, rel_bops=50.0)
    v = both.violations(s)
    assert set(v) == {"bops", "weight_bytes"}
    assert v["bops"] == pytest.approx(1.0) and v["weight_bytes"] == pytest.approx(0.5)
    assert cost.Budget(rel_bops=s.rel_bops * 0.5).violations(s) == {"rel_bops": pytest.approx(1.0)}
    assert cost.Budget(cost=1.0).violations(s)["cost"] == pytest.approx(s.cost - 1.0)
    assert cost.Budget(bops=1e8).limits() == {"bops": 1e8}
