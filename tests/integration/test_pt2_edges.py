"""`.pt2` edges: aten-level conv + batch norm is folded; a fixed batch size is named the same way everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import fx, nn
from typer.testing import CliRunner

from cgmq_cli import checkpoint, qmodel
from cgmq_cli.cli import app
from cgmq_cli.graph import passes, trace

runner = CliRunner()
aten = torch.ops.aten


class ConvBN(nn.Module):
    def __init__(self, share: bool = False) -> None:
        super().__init__()
        self.share = share
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)
        with torch.no_grad():  # statistics far from the identity, so that an unfolded BN would show
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 2)
            self.bn.bias.uniform_(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = torch.relu(self.bn(y))
        if self.share:  # the conv output feeds something else too: the BN cannot be folded
            z = z + y
        return self.fc(z.flatten(1))


def _save(model: nn.Module, path: Path, dynamic: bool = True, batch: int = 2) -> Path:
    torch.manual_seed(0)
    example = (torch.randn(batch, 1, 8, 8),)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(model.eval(), example, dynamic_shapes=shapes), str(path))
    return path


@pytest.fixture(scope="module")
def bn_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(ConvBN(), tmp_path_factory.mktemp("pt2") / "bn.pt2")


def test_aten_batch_norm_is_folded_exactly(bn_pt2: Path) -> None:
    module, _ = checkpoint.load_model(str(bn_pt2))
    assert any(n.target == aten.batch_norm.default for n in module.graph.nodes)
    x = torch.randn(5, 1, 8, 8)
    reference = module(x)
    gm = passes.fold_aten_batchnorm(trace.trace(module))
    assert passes.batchnorms(gm) == []
    assert torch.allclose(gm(x), reference, atol=1e-5)
    qm = qmodel.prepare(module, (1, 8, 8))
    assert [l.name for l in qm.layers] == ["conv", "fc"] and passes.batchnorms(qm.gm) == []


def test_native_no_training_form_and_a_conv_without_bias() -> None:
    class Native(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 1, 3, 3))
            self.g, self.b = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))
            self.register_buffer("m", torch.randn(4))
            self.register_buffer("v", torch.rand(4) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = aten.conv2d.default(x, self.w)
            return aten._native_batch_norm_legit_no_training.default(y, self.g, self.b, self.m, self.v, 0.1, 1e-5)[0]

    gm = fx.symbolic_trace(Native())
    x = torch.randn(3, 1, 6, 6)
    reference = gm(x)
    passes.fold_aten_batchnorm(gm)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [aten.conv2d.default]
    assert torch.allclose(gm(x), reference, atol=1e-5)


def test_unfoldable_batch_norm_is_named(tmp_path: Path) -> None:
    path = _save(ConvBN(share=True), tmp_path / "shared.pt2")
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    notes = json.loads(result.stdout)["notes"]
    assert len(notes) == 1 and notes[0].startswith("1 BatchNorm(s) stay unfolded (float, not quantized")
    assert f"note: {notes[0]}" in result.stderr
    folded = runner.invoke(app, ["inspect", str(_save(ConvBN(), tmp_path / "folded.pt2")), "--json"])
    assert json.loads(folded.stdout)["notes"] == []


def test_fixed_batch_is_named_by_inspect_too(tmp_path: Path) -> None:
    one = _save(ConvBN(), tmp_path / "b1.pt2", dynamic=False, batch=1)
    result = runner.invoke(app, ["inspect", str(one)])
    assert result.exit_code == 0
    assert "fixed batch size of 1; cgmq trains and evaluates on batches: inspect works, but compress will refuse it; " \
           "export it with a dynamic batch dimension" in result.stderr
    four = _save(ConvBN(), tmp_path / "b4.pt2", dynamic=False, batch=4)
    refused = runner.invoke(app, ["inspect", str(four)])
    assert refused.exit_code == 2
    assert refused.stderr.splitlines()[0].endswith("was exported with a fixed batch size of 4; cgmq trains and "
                                                   "evaluates on batches")
    assert refused.stderr.splitlines()[1].startswith("hint: export it with a dynamic batch dimension")
