"""int8-cpu exports run as onnxruntime integer kernels end to end (residual add, concat, pooling, linear).

The counts are what onnxruntime's optimiser reports (``optimized_model_filepath``)
for a file cgmq wrote; they fail if a layout change or a newer onnxruntime
leaves a layer in float.
"""

from __future__ import annotations

import collections
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import nn

from cgmq_cli import api
from cgmq_cli.export import onnx_qdq, verify
from cgmq_cli.profiles import load_profile


class ResCat(nn.Module):
    """stem (conv-BN-ReLU, max-pool), a residual block, a side branch concatenated, conv, avg-pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.side = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU(), nn.AvgPool2d(4))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(x + self.branch(x))
        z = torch.cat([y, self.side(x)], dim=1)
        return self.head(torch.flatten(self.mix(z), 1))


def _kernels(path: Path, tmp: Path) -> collections.Counter:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def test_all_8_bit_int8_cpu_export_is_integer_kernels_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qm = api.prepare(ResCat(), (3, 8, 8), (), load_profile("int8-cpu"))
    qm.calibrate(torch.rand(64, 3, 8, 8))
    qm.set_widths({key: 8 for key in qm.tensor_quantizers()})
    info = onnx_qdq.export_qdq(qm, tmp_path / "m.onnx", parity_inputs=[torch.rand(64, 3, 8, 8)])
    assert info.parity.agreement >= 99.9
    kernels = _kernels(info.path, tmp_path)
    assert kernels == collections.Counter({
        "QLinearConv": 5, "QLinearAdd": 1, "QLinearConcat": 1, "QLinearAveragePool": 1, "NhwcMaxPool": 1,
        "QGemm": 1, "QuantizeLinear": 1, "Transpose": 2, "Reshape": 1})
    result = verify.read_widths(info.path)
    assert result.bops == qm.cost().bops and result.weight_bytes == qm.cost().weight_bytes
    assert all(r.lint.startswith("integer kernel") for r in result.layers)


def test_a_float_layer_stays_float_and_its_neighbours_stay_integer(tmp_path: Path) -> None:
    """A 32-bit input (the budget kept it float) dequantizes only that layer."""
    torch.manual_seed(0)
    qm = api.prepare(ResCat(), (3, 8, 8), (), load_profile("int8-cpu"))
    qm.calibrate(torch.rand(64, 3, 8, 8))
    widths = {key: 8 for key in qm.tensor_quantizers()}
    widths[qm.layers[-1].act_keys[0]] = 32  # the head's input stays float
    qm.set_widths(widths)
    info = onnx_qdq.export_qdq(qm, tmp_path / "m.onnx", parity_inputs=[torch.rand(64, 3, 8, 8)])
    kernels = _kernels(info.path, tmp_path)
    assert kernels["QLinearConv"] == 5 and kernels["QLinearAdd"] == 1 and kernels["QGemm"] == 0
    rows = {r.node: r for r in verify.read_widths(info.path).layers}
    assert rows["head"].bits_a == 32 and not rows["head"].lint.startswith("integer")
