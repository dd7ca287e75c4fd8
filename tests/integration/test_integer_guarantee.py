"""The integer-kernel guarantee of integer profiles: what onnxruntime fuses, and the reason when it does not.

Every reason below is the one onnxruntime's QDQ selector rules give for a
pattern, and each test first checks that onnxruntime really left that node in
float (so the test fails if a newer onnxruntime fuses it after all).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from cgmq_cli import api
from cgmq_cli.errors import CheckFailedError
from cgmq_cli.export import diagnose, onnx_qdq
from cgmq_cli.profiles import load_profile
from test_export_integer import ResCat

OPS = ("conv", "linear", "add", "concat", "pooling")


def _rescat(widths_of=None):
    torch.manual_seed(0)
    qm = api.prepare(ResCat(), (3, 8, 8), (), load_profile("int8-cpu"))
    qm.calibrate(torch.rand(64, 3, 8, 8))
    widths = {key: 8 for key in qm.tensor_quantizers()}
    if widths_of is not None:
        widths_of(qm, widths)
    qm.set_widths(widths)
    return qm


@pytest.fixture(scope="module")
def all_8_bit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    info = onnx_qdq.export_qdq(_rescat(), tmp_path_factory.mktemp("int8") / "m.onnx")
    return info.path


def test_all_8_bit_export_keeps_every_promise(tmp_path: Path) -> None:
    info = onnx_qdq.export_qdq(_rescat(), tmp_path / "m.onnx")
    assert [(f.op, f.kernel) for f in info.kernels] == [
        ("Conv", "QLinearConv"), ("MaxPool", "NhwcMaxPool"), ("Conv", "QLinearConv"), ("Conv", "QLinearConv"),
        ("Add", "QLinearAdd"), ("Conv", "QLinearConv"), ("Concat", "QLinearConcat"), ("Conv", "QLinearConv"),
        ("AveragePool", "QLinearAveragePool"), ("Gemm", "QGemm")]
    assert all(f.integer for f in info.kernels)


def _float_input_of_branch3(qm, widths) -> None:
    """branch.3 reads its input in float: branch.0 (8/8) then has no quantized output to fuse into."""
    widths[next(l for l in qm.layers if l.name == "branch.3").act_keys[0]] = 32


def test_an_8_8_layer_that_would_run_in_float_fails_the_export(tmp_path: Path) -> None:
    qm = _rescat(_float_input_of_branch3)
    with pytest.raises(CheckFailedError) as failed:
        onnx_qdq.export_qdq(qm, tmp_path / "m.onnx")
    assert failed.value.exit_code == 4
    assert "1 of 9 ops" in failed.value.message and "Conv `branch.0` runs as FusedConv" in failed.value.message
    assert "read by Conv `branch.3`, not by a QuantizeLinear" in failed.value.message
    assert "--allow-float-fallback" in failed.value.hint
    assert not (tmp_path / "m.onnx").exists()


def test_allow_float_fallback_writes_the_file_and_reports_the_op(tmp_path: Path) -> None:
    info = onnx_qdq.export_qdq(_rescat(_float_input_of_branch3), tmp_path / "m.onnx", allow_float_fallback=True)
    assert info.path.exists()
    assert [(f.node, f.kernel) for f in info.kernels if not f.integer] == [("branch.0", "FusedConv")]
    assert sum(f.integer for f in info.kernels) == 8


# ---------------------------------------------------------- tampered files ---
def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    next(t for t in model.graph.initializer if t.name == name).CopyFrom(numpy_helper.from_array(value, name))


def _guard_before_mix(model: onnx.ModelProto) -> None:
    conv = _node(model, "mix.0")
    model.graph.initializer.extend([numpy_helper.from_array(np.array(0, np.float32), "lo"),
                                    numpy_helper.from_array(np.array(99, np.float32), "hi")])
    at = list(model.graph.node).index(conv)
    model.graph.node.insert(at, helper.make_node("Min", ["above", "hi"], ["guarded"], name="guard_min"))
    model.graph.node.insert(at, helper.make_node("Max", [conv.input[0], "lo"], ["above"], name="guard_max"))
    conv.input[0] = "guarded"


def _second_reader_of_stem_relu(model: onnx.ModelProto) -> None:
    model.graph.node.append(helper.make_node("Identity", ["relu"], ["spy"], name="spy"))
    model.graph.output.append(helper.make_empty_tensor_value_info("spy"))


def _nonzero_zero_point_after_relu(model: onnx.ModelProto) -> None:
    _set_init(model, "a_branch_2/zero_point", np.array(3, np.uint8))


def _float_bias_on_float_output(model: onnx.ModelProto) -> None:
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(5, np.float32), "head.float_bias"))
    _node(model, "head").input[2] = "head.float_bias"


@pytest.mark.parametrize("tamper,node,kernel,reason", [
    (_guard_before_mix, "mix.0", "Conv", "input 0 (`guarded`) comes from Min `guard_min`, not straight from a "
                                         "DequantizeLinear"),
    (_second_reader_of_stem_relu, "stem.0", "FusedConv", "the Relu `node_relu` after it is read by QuantizeLinear "
                                                          "`a_stem_2/QuantizeLinear`, Identity `spy`"),
    (_nonzero_zero_point_after_relu, "branch.0", "FusedConv", "the zero point is 3, onnxruntime drops a Relu only "
                                                              "when it is the type's minimum 0"),
    (_float_bias_on_float_output, "head", "Gemm", "its float bias stays float when the output is not quantized"),
])
def test_diagnosis_names_the_blocking_pattern(all_8_bit: Path, tmp_path: Path, tamper, node, kernel, reason) -> None:
    model = copy.deepcopy(onnx.load(all_8_bit))
    tamper(model)
    path = tmp_path / "t.onnx"
    onnx.save(model, path)
    failed = {f.node: f for f in diagnose.check(path, OPS) if not f.integer}
    assert set(failed) == {node}, failed
    assert failed[node].kernel == kernel and reason in failed[node].reason, failed[node]
    with pytest.raises(CheckFailedError, match=f"`{node}`"):
        diagnose.require(diagnose.check(path, OPS))


def test_float_weights_promise_only_the_tensor_ops(tmp_path: Path) -> None:
    """Layers kept float (32-bit weights) are not promised; the all-8-bit adds, concat and pools still are."""
    def float_weights(qm, widths) -> None:
        widths.update({l.weight_key: 32 for l in qm.layers})

    info = onnx_qdq.export_qdq(_rescat(float_weights), tmp_path / "m.onnx")
    assert [(f.op, f.kernel) for f in info.kernels] == [
        ("MaxPool", "MaxPool"), ("Add", "QLinearAdd"), ("Concat", "QLinearConcat"),
        ("AveragePool", "QLinearAveragePool")]  # the max-pool runs on uint8 (no DequantizeLinear before it)
    assert all(f.integer for f in info.kernels)
