"""`cgmq verify` never passes what it cannot measure: files of other quantizers, and files it cannot read.

The quantized files are made here with onnxruntime.quantization from one tiny
float model (Conv 3->4, 3x3, padding 1, on 3x8x8; ReLU; Flatten; Gemm 256->5),
whose cost is counted by hand:

    conv MACs = 4 x 8 x 8 (outputs) x 3 x 3 x 3 (Cin x kernel) = 6,912
    fc MACs   = 5 x 256                                       = 1,280
    BOPs at 8 x 8 bits = (6,912 + 1,280) x 64                 = 524,288
    weight bytes = 108 + 4 x 4 (int32 or float bias)  = 124    (conv)
                 + 1,280 + 5 x 4                      = 1,300  (fc)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from cli_helpers import cli, one_line_error

quantization = pytest.importorskip("onnxruntime.quantization")

CONV_MACS, FC_MACS = 6_912, 1_280
BOPS_8X8 = (CONV_MACS + FC_MACS) * 64
WEIGHT_BYTES = 124 + 1_300


def _float_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv.w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "conv.b"),
             numpy_helper.from_array(rng.standard_normal((5, 256)).astype(np.float32) / 16, "fc.w"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fc.b")]
    nodes = [helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 5])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


class _Reader(quantization.CalibrationDataReader):
    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        self.batches = iter([{"x": rng.random((1, 3, 8, 8), dtype=np.float32)} for _ in range(4)])

    def get_next(self):
        return next(self.batches, None)


def _verify_json(path: Path) -> dict:
    result = cli("verify", path, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _assert_hand_counts(read: dict, ops: list[str]) -> None:
    assert [row["op"] for row in read["layers"]] == ops
    assert [row["macs"] for row in read["layers"]] == [CONV_MACS, FC_MACS]
    assert [(row["bits_w"], row["bits_a"]) for row in read["layers"]] == [(8, 8), (8, 8)]
    assert read["bops"] == BOPS_8X8 and read["weight_bytes"] == WEIGHT_BYTES


def test_qoperator_file_reads_its_integer_kernels(tmp_path: Path) -> None:
    out = tmp_path / "qop.onnx"
    quantization.quantize_static(str(_float_model(tmp_path / "f.onnx")), str(out), _Reader(),
                                 quant_format=quantization.QuantFormat.QOperator)
    read = _verify_json(out)
    _assert_hand_counts(read, ["QLinearConv", "QGemm"])
    assert all(row["lint"].startswith("integer kernel") for row in read["layers"])
    one_line_error(cli("verify", out, "--budget-bops", BOPS_8X8 - 1), 4, "over budget")


def test_dynamic_quantized_file_reads_conv_and_matmul_integer(tmp_path: Path) -> None:
    out = tmp_path / "dyn.onnx"
    quantization.quantize_dynamic(str(_float_model(tmp_path / "f.onnx")), str(out))
    read = _verify_json(out)
    _assert_hand_counts(read, ["ConvInteger", "MatMulInteger"])
    assert cli("verify", out, "--budget-bops", BOPS_8X8).exit_code == 0


def test_com_microsoft_qdq_file_reads_like_a_standard_one(tmp_path: Path) -> None:
    out = tmp_path / "ms.onnx"
    quantization.quantize_static(str(_float_model(tmp_path / "f.onnx")), str(out), _Reader(),
                                 extra_options={"UseQDQContribOps": True})
    assert {n.domain for n in onnx.load(out).graph.node if n.op_type == "DequantizeLinear"} == {"com.microsoft"}
    _assert_hand_counts(_verify_json(out), ["Conv", "Gemm"])


def test_float_file_counts_32_bits(tmp_path: Path) -> None:
    read = _verify_json(_float_model(tmp_path / "f.onnx"))
    assert read["bops"] == (CONV_MACS + FC_MACS) * 32 * 32


def test_empty_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    one_line_error(cli("verify", path, "--budget-bops", 1), 2, "empty.onnx is empty")


def test_file_onnxruntime_cannot_load_exits_2(tmp_path: Path) -> None:
    model = onnx.load(_float_model(tmp_path / "f.onnx"))
    model.graph.node.append(helper.make_node("Frobnicate", ["y"], ["z"], domain="acme"))
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("acme", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    one_line_error(cli("verify", path, "--budget-bops", 10**12), 2, "onnxruntime", "cannot load custom.onnx")


def test_file_without_compute_exits_2(tmp_path: Path) -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TP.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, [1, 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    one_line_error(cli("verify", path, "--budget-bops", 1), 2, "cannot measure")


def test_file_with_uncounted_compute_exits_2(tmp_path: Path) -> None:
    """A ConvTranspose has MACs verify does not count: reading the rest would report too few BOPs."""
    model = onnx.load(_float_model(tmp_path / "f.onnx"))
    w = numpy_helper.from_array(np.ones((5, 2, 3), np.float32), "up.w")
    model.graph.initializer.append(w)
    model.graph.node.extend([helper.make_node("Unsqueeze", ["y", "axis"], ["y3"]),
                             helper.make_node("ConvTranspose", ["y3", "up.w"], ["z"])])
    model.graph.initializer.append(numpy_helper.from_array(np.array([2], np.int64), "axis"))
    model.graph.output[0].name = "z"
    del model.graph.output[0].type.tensor_type.shape.dim[:]
    path = tmp_path / "deconv.onnx"
    onnx.save(model, path)
    one_line_error(cli("verify", path), 2, "ConvTranspose (1)")
