"""Quantizer insertion on real graphs: layer and call-site counts, BN folding, 16-bit parity, --leaf, inspect.

Parity: with every tensor at 16 bits (network input too) and steps calibrated on
the batch itself, the quantized model must reproduce the float model (eval mode)
to a relative max error below PARITY_TOL of the output's max |value|.
"""

from __future__ import annotations

from pathlib import Path

import copy
import json

import pytest
import torch
import torch.nn.functional as Fn
import torchvision
from torch import fx, nn
from typer.testing import CliRunner

from cgmq_cli import qmodel
from cgmq_cli.cli import app
from cgmq_cli.errors import TraceError
from cgmq_cli.graph import passes

PARITY_TOL = 1e-3
CONV_LINEAR = (Fn.conv1d, Fn.conv2d, Fn.linear)


# ----------------------------------------------------------------- models ---


class CatNet(nn.Module):
    """Two branches concatenated along channels, then a 1x1 conv and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.mix = nn.Conv2d(10, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.bn(self.b(x)))], dim=1)
        return self.head(self.mix(y).mean(dim=(2, 3)))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(8)
        self.c2 = nn.Conv1d(8, 8, 3, stride=2, groups=2)
        self.fc = nn.Linear(8 * 15, 3)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)))
        return self.fc(torch.relu(self.c2(y)).flatten(1))


class FunctionalNet(nn.Module):
    """F.conv2d / F.linear on parameters (positional and keyword weights), no modules."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b = nn.Parameter(torch.randn(8) * 0.1)
        self.dw = nn.Parameter(torch.randn(8, 1, 3, 3) * 0.3)
        self.fc_w = nn.Parameter(torch.randn(4, 8 * 6 * 6) * 0.05)

    def forward(self, x):
        y = torch.relu(Fn.conv2d(x, self.w, self.b, stride=2, padding=1))
        y = torch.relu(Fn.conv2d(y, weight=self.dw, padding=1, groups=8))
        return Fn.linear(y.flatten(1), self.fc_w)


class ReuseNet(nn.Module):
    """One Linear called twice: one quantizer pair, MACs counted twice."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(12, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        return self.out(torch.relu(self.shared(torch.relu(self.shared(x)))))


class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.grouped(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        return self.pw(x)


def _untraceable_net() -> nn.Module:
    """The CLI tests' fixture: data-dependent control flow inside the submodule `gate`."""
    import runpy

    path = Path(__file__).resolve().parents[1] / "e2e" / "fixtures" / "untraceable.py"
    return runpy.run_path(str(path))["UntraceableNet"]()


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine terms, so that folding is really tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


# ---------------------------------------------------------------- helpers ---


def _graph_facts(gm: fx.GraphModule) -> dict:
    modules = dict(gm.named_modules())
    bn_calls = [n for n in gm.graph.nodes
                if (n.op == "call_module" and isinstance(modules.get(n.target), nn.modules.batchnorm._BatchNorm))
                or (n.op == "call_function" and n.target in (Fn.batch_norm, torch.batch_norm))]
    float_modules = [n for n in gm.graph.nodes
                     if n.op == "call_module" and type(modules.get(n.target)) in (nn.Conv1d, nn.Conv2d, nn.Linear)]
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CONV_LINEAR]
    for node in calls:  # every conv/linear reads quantized operands
        x, w = node.args[0], node.args[1]
        assert x.op == "call_module" and x.target.startswith("cgmq.a_"), node
        assert w.op == "call_module" and w.target.startswith("cgmq.w_"), node
    return {"bn": len(bn_calls), "float_layers": len(float_modules), "calls": len(calls)}


def _check_parity(model: nn.Module, sample_shape, widths_for=qmodel.all_widths, batch: int = 2, seed: int = 0):
    """Prepare at 16 bits, calibrate on the batch, compare with the float model in eval mode."""
    torch.manual_seed(seed)
    model = model.eval()
    x = torch.randn(batch, *sample_shape)
    with torch.no_grad():
        want = model(x)
    qm = qmodel.prepare(copy.deepcopy(model), sample_shape, widths_for=widths_for, input_bits=16)
    qm.set_bits({name: (16, 16) for name in qm.bits()})
    qm.calibrate(x)
    assert qm.bits() == {name: (16, 16) for name in qm.bits()}
    with torch.no_grad():
        got = qm.gm.eval()(x)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < PARITY_TOL, err
    assert not torch.equal(got, want)  # the quantizers really are in the path
    return qm, err


def _16_only(*_args):
    """Only 16 (and float) allowed: calibration then fits one step per tensor, which keeps
    the large torchvision models fast (the MSE search runs over every weight)."""
    return (16, 32), (16, 32)


@pytest.fixture
def coarse_mse_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """A coarser clipping grid (5 + 5 points instead of 25 + 25) for the 3.5M / 11M-weight
    torchvision models: 5x faster on two cores. The search itself is tested in
    tests/unit/test_quant.py; the small models below calibrate with the real grid."""
    from cgmq_cli.quant import functional as QF

    real = QF.mse_optimal_step
    monkeypatch.setattr(QF, "mse_optimal_step", lambda *a, **k: real(*a, **{**k, "n_grid": 5}))


# --------------------------------------------------------- torchvision ---


def test_resnet18_insertion_fold_and_parity(coarse_mse_search) -> None:
    model = _randomise_bn(torchvision.models.resnet18(num_classes=10))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn == 20
    qm, _ = _check_parity(model, (3, 32, 32), widths_for=_16_only)
    facts = _graph_facts(qm.gm)
    assert len(qm.layers) == 21  # 20 convs (incl. 3 downsample) + fc
    assert facts == {"bn": 0, "float_layers": 0, "calls": 21}
    assert [layer.op for layer in qm.layers].count("linear") == 1
    assert qm.layers[0].name == "conv1" and qm.layers[0].takes_network_input
    assert sum(layer.takes_network_input for layer in qm.layers) == 1
    assert qm.allowed()["w_conv1"] == (16, 32) and qm.allowed()["a_x"] == (16,)  # input width: input_bits
    # one quantizer per tensor: a stage's conv1 and downsample read one input quantizer
    by_name = {layer.name: layer for layer in qm.layers}
    assert by_name["layer2.0.conv1"].act_keys == by_name["layer2.0.downsample.0"].act_keys
    # BN folded: every conv now has a bias
    assert all(layer.bias_params > 0 for layer in qm.layers)


def test_mobilenet_v2_insertion_fold_and_parity(coarse_mse_search) -> None:
    model = _randomise_bn(torchvision.models.mobilenet_v2(num_classes=10))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 52
    qm, _ = _check_parity(model, (3, 32, 32), widths_for=_16_only)
    ops = [layer.op for layer in qm.layers]
    assert len(qm.layers) == 53  # 52 convs + classifier
    assert ops.count("depthwise") == 17 and ops.count("linear") == 1
    assert _graph_facts(qm.gm) == {"bn": 0, "float_layers": 0, "calls": 53}


# ------------------------------------------------------------ small nets ---


def test_cat_model() -> None:
    qm, _ = _check_parity(_randomise_bn(CatNet()), (3, 8, 8))
    assert [layer.name for layer in qm.layers] == ["a", "b", "mix", "head"]
    assert [layer.takes_network_input for layer in qm.layers] == [True, True, False, False]
    assert qm.layers[0].act_keys == qm.layers[1].act_keys == ("a_x",)  # both branches read the input
    assert _graph_facts(qm.gm) == {"bn": 0, "float_layers": 0, "calls": 4}
    macs = {s.name: s.macs for s in qm.shapes}
    assert macs == {"a": 4 * 64 * 27, "b": 6 * 64 * 3, "mix": 8 * 64 * 10, "head": 40}


def test_conv1d_model_with_bn_and_groups() -> None:
    qm, _ = _check_parity(_randomise_bn(Conv1dNet()), (4, 32))
    assert [(layer.name, layer.op) for layer in qm.layers] == [("c1", "conv1d"), ("c2", "conv1d"), ("fc", "linear")]
    assert _graph_facts(qm.gm) == {"bn": 0, "float_layers": 0, "calls": 3}
    macs = {s.name: s.macs for s in qm.shapes}
    # c1: 8 x 32 x 4 x 5; c2: out length (32 - 3) // 2 + 1 = 15, 8 x 15 x (8/2) x 3
    assert macs == {"c1": 8 * 32 * 20, "c2": 8 * 15 * 12, "fc": 3 * 120}


def test_functional_layers_with_parameter_weights() -> None:
    qm, _ = _check_parity(FunctionalNet(), (3, 12, 12))
    assert [(layer.name, layer.op) for layer in qm.layers] == [("w", "conv2d"), ("dw", "depthwise"), ("fc_w", "linear")]
    assert [layer.bias_params for layer in qm.layers] == [8, 0, 0]
    assert _graph_facts(qm.gm)["calls"] == 3
    macs = {s.name: s.macs for s in qm.shapes}
    assert macs == {"w": 8 * 36 * 27, "dw": 8 * 36 * 9, "fc_w": 4 * 288}


def test_module_reused_twice() -> None:
    """One Linear called on two tensors: one weight quantizer (stored once), one input quantizer per call."""
    qm, _ = _check_parity(ReuseNet(), (12,))
    assert [layer.name for layer in qm.layers] == ["shared", "shared#1", "out"]
    assert qm.layers[0].weight_key == qm.layers[1].weight_key == "w_shared"
    assert qm.layers[0].act_keys != qm.layers[1].act_keys
    assert [layer.params for layer in qm.layers] == [144, 0, 36]  # the shared weight's bytes count once
    assert len(passes.quantizers(qm.gm)) == 5  # 2 weights + 3 input tensors
    macs = {s.name: s.macs for s in qm.shapes}
    assert macs == {"shared": 144, "shared#1": 144, "out": 36}
    facts = _graph_facts(qm.gm)
    assert facts["calls"] == 3
    targets = [n.args[1].target for n in qm.gm.graph.nodes if n.op == "call_function" and n.target is Fn.linear]
    assert targets.count("cgmq.w_shared") == 2


def test_grouped_and_depthwise_with_bn() -> None:
    qm, _ = _check_parity(_randomise_bn(GroupedNet()), (3, 8, 8))
    assert [(layer.name, layer.op) for layer in qm.layers] == [
        ("stem", "conv2d"), ("grouped", "conv2d"), ("dw", "depthwise"), ("pw", "conv2d")]
    assert [layer.bias_params for layer in qm.layers] == [8, 16, 16, 4]  # folded BN adds a bias
    assert _graph_facts(qm.gm) == {"bn": 0, "float_layers": 0, "calls": 4}
    macs = {s.name: s.macs for s in qm.shapes}
    assert macs == {"stem": 8 * 64 * 27, "grouped": 16 * 64 * 18, "dw": 16 * 64 * 9, "pw": 4 * 64 * 16}


def test_shared_conv_before_bn_is_not_folded() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)

    qm, _ = _check_parity(_randomise_bn(Shared()), (3, 4, 4))
    assert _graph_facts(qm.gm)["bn"] == 1  # folding would change the conv's other use


@pytest.mark.parametrize("widths", [(2, 4, 8, 16, 32), (8,)])
def test_calibration_sees_float_activations(widths) -> None:
    """Activation steps come from the float model's layer inputs, even when a width set has no
    32 (the network input always, a fixed-width profile everywhere)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(128, 4)).eval()
    x = torch.randn(4, 3, 8, 8) * 3
    seen = {}
    for name in ("2", "5"):
        model.get_submodule(name).register_forward_pre_hook(lambda _m, a, name=name: seen.setdefault(name, a[0].detach()))
    with torch.no_grad():
        model(x)
    qm = qmodel.prepare(copy.deepcopy(model), (3, 8, 8), widths_for=lambda *_: (widths, widths), input_bits=8)
    qm.set_bits({"0": (widths[0], 8), "2": (widths[0], widths[0]), "5": (widths[0], widths[0])})
    qm.calibrate(x)
    from cgmq_cli.quant import functional as QF
    for name in ("2", "5"):
        act = qm.quantizers()[name][1]
        assert not act.is_signed  # after ReLU
        for bits in (b for b in widths if b < 32):
            torch.testing.assert_close(act.step(bits), QF.mse_optimal_step(seen[name].reshape(-1), bits, False, False))
    assert qm.bits() == {"0": (widths[0], 8), "2": (widths[0], widths[0]), "5": (widths[0], widths[0])}


# ------------------------------------------------------------------ --leaf ---


def test_untraceable_submodule_names_it_and_leaf_fixes_it() -> None:
    with pytest.raises(TraceError) as info:
        qmodel.prepare(_untraceable_net(), (3, 8, 8))
    assert "`gate`" in info.value.message
    assert "data-dependent control flow" in info.value.message
    assert "--leaf gate" in info.value.hint
    qm = qmodel.prepare(_untraceable_net(), (3, 8, 8), leaves=["gate"])
    assert [layer.name for layer in qm.layers] == ["stem", "head"]  # gate.conv stays float
    modules = dict(qm.gm.named_modules())
    assert any(n.op == "call_module" and n.target == "gate" for n in qm.gm.graph.nodes)
    assert type(modules["gate"]).__name__ == "Gate"  # kept whole, not traced into


def test_leaf_naming_missing_module() -> None:
    with pytest.raises(TraceError, match="no submodule of that name") as info:
        qmodel.prepare(_untraceable_net(), (3, 8, 8), leaves=["gaet"])
    assert "gate" in info.value.hint


# ------------------------------------------------------------------ inspect ---


def _weight_params(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


@pytest.mark.parametrize("name, macs", [
    ("resnet18", 1814073344),
    ("mobilenet_v2", 300774272),
    ("resnet50", 4089184256),
])
def test_inspect_json_torchvision_macs(name: str, macs: int) -> None:
    result = CliRunner().invoke(app, ["inspect", f"torchvision:{name}", "--input-shape", "1,3,224,224", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"layers", "totals", "float_ops", "notes"}
    assert set(data["totals"]) == {"macs", "quantized_macs", "coverage", "params", "float_params", "bops_fp32"}
    assert data["float_ops"] == [] and data["totals"]["coverage"] == 100.0
    assert data["totals"]["quantized_macs"] == macs
    assert all(set(layer) == {"name", "op", "macs", "params"} for layer in data["layers"])
    assert data["totals"]["macs"] == macs
    assert sum(layer["macs"] for layer in data["layers"]) == macs
    assert data["totals"]["bops_fp32"] == macs * 32 * 32
    model = torchvision.models.get_model(name, weights=None)
    assert data["totals"]["params"] == _weight_params(model)
    assert len(data["layers"]) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert {layer["op"] for layer in data["layers"]} <= {"conv2d", "depthwise", "linear"}
