"""`--portable` files: opset 21 containers that onnxruntime and OpenVINO both load, with the same BOPs read back.

Every width mix the other export tests write (layer kinds x 2/4/8/16 bits, the
mixed residual and sequence models, the int8-cpu models) is exported here with
``portable=True``. The structural checks always run; loading each file in
OpenVINO 2026 (and comparing its outputs with onnxruntime's) runs when the
optional extra is installed.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto as TP

from cgmq_cli import api, qmodel
from cgmq_cli.errors import CgmqError, ExportError
from cgmq_cli.export import onnx_qdq, openvino, verify
from cgmq_cli.profiles import load_profile
from test_export_integer import ResCat
from test_export_qdq import KINDS, WIDTHS, Residual, Sequence, _build

needs_openvino = pytest.mark.skipif(not openvino.available(), reason="OpenVINO is not installed (pip install openvino)")
SMALL_ACT_TYPES = {TP.UINT4, TP.INT4, TP.UINT2, TP.INT2}


def _prepared(model, shape, profile=None, seed=0):
    torch.manual_seed(seed)
    qm = api.prepare(model, shape, (), load_profile(profile)) if profile else qmodel.prepare(model, shape)
    qm.calibrate(torch.rand(64, *shape))
    return qm


def _width_mixes():
    """(id, build) of every width mix; build() returns a prepared model at its widths."""
    cases = []
    for kind in KINDS:
        for bits in WIDTHS:
            def build(kind=kind, bits=bits):
                model, shape = _build(kind)
                qm = _prepared(model, shape)
                qm.set_bits({l.name: (bits, 8 if l.takes_network_input else bits) for l in qm.layers})
                return qm
            cases.append((f"{kind}-{bits}", build))

    def older():
        model, shape = _build("conv")
        qm = _prepared(model, shape)
        qm.set_bits({qm.layers[0].name: (2, 8), qm.layers[1].name: (4, 2)})
        return qm

    def int4_into_int8_linear():  # the pattern OpenVINO 2026.4 aborts on when the input stays uint4
        model, shape = _build("linear")
        qm = _prepared(model, shape)
        qm.set_bits({qm.layers[0].name: (4, 8), qm.layers[1].name: (8, 4)})
        return qm

    def int2_into_int8_conv():
        model, shape = _build("conv")
        qm = _prepared(model, shape)
        qm.set_bits({qm.layers[0].name: (8, 8), qm.layers[1].name: (8, 2)})
        return qm

    def residual():
        qm = _prepared(Residual(), (1, 8, 8))
        qm.set_bits({"stem": (4, 8), "dw": (2, 4), "pw": (32, 16), "fc": (8, 32)})
        return qm

    def residual_8bit_weights():
        qm = _prepared(Residual(), (1, 8, 8))
        qm.set_bits({"stem": (8, 8), "dw": (8, 4), "pw": (8, 2), "fc": (8, 4)})
        return qm

    def sequence():
        torch.manual_seed(0)
        qm = qmodel.prepare(Sequence(), (4, 10))
        qm.calibrate(torch.randn(64, 4, 10))
        qm.set_bits({"conv": (8, 8), "mix": (2, 4), "mix#1": (2, 4), "head": (4, 2)})
        return qm

    def int8_cpu(head_float=False):
        qm = _prepared(ResCat(), (3, 8, 8), "int8-cpu")
        widths = {key: 8 for key in qm.tensor_quantizers()}
        if head_float:
            widths[qm.layers[-1].act_keys[0]] = 32
        qm.set_widths(widths)
        return qm

    cases += [("conv-2-8-4-2", older), ("linear-uint4-into-int8", int4_into_int8_linear),
              ("conv-int2-into-int8", int2_into_int8_conv), ("residual-mixed", residual),
              ("residual-8bit-weights", residual_8bit_weights), ("sequence-mixed", sequence),
              ("int8-cpu", int8_cpu), ("int8-cpu-float-head", lambda: int8_cpu(head_float=True))]
    return cases


CASES = _width_mixes()


def _export(build, tmp_path: Path):
    qm = build()
    info = onnx_qdq.export_qdq(qm, tmp_path / "p.onnx", opset=onnx_qdq.PORTABLE_OPSET, portable=True,
                               parity_inputs=[torch.rand(32, *qm.sample_shape, generator=torch.Generator().manual_seed(1))])
    return qm, info


_CACHE: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """name -> (cost, ExportInfo): each width mix is exported once for the tests below."""
    def get(name: str) -> tuple:
        if name not in _CACHE:
            qm, info = _export(dict(CASES)[name], tmp_path_factory.mktemp(name))
            _CACHE[name] = (qm.cost(), info)
        return _CACHE[name]
    yield get
    _CACHE.clear()


def _act_types_into_8bit_weights(model: onnx.ModelProto) -> set[int]:
    """Element types of the activations (DequantizeLinear of a non-constant) that feed a layer with int8 weights."""
    init = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def source_dq(name: str):
        while name in producer and producer[name].op_type in ("Max", "Min", "Reshape", "Flatten", "Transpose"):
            node = producer[name]
            name = next(i for i in node.input if i not in init)
        node = producer.get(name)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def elem(dq) -> int | None:
        codes = dq.input[0]
        if codes in init:
            return init[codes].data_type
        q = producer.get(codes)
        while q is not None and q.op_type == "Clip":
            q = producer.get(q.input[0])
        zero = q.input[2] if q is not None and len(q.input) > 2 else None
        return init[zero].data_type if zero in init else None

    found = set()
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        weight, act = source_dq(node.input[1]), source_dq(node.input[0])
        if weight is not None and act is not None and weight.input[0] in init and elem(weight) == TP.INT8:
            found.add(elem(act))
    return found


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_portable_file_types_and_bops(name: str, exported) -> None:
    cost, info = exported(name)
    model = onnx.load(info.path)
    assert info.opset == 21 and model.opset_import[0].version == 21
    types = {t.data_type for t in model.graph.initializer}
    assert not types & {TP.INT2, TP.UINT2}  # 2-bit values travel in int4 / uint4
    assert not _act_types_into_8bit_weights(model) & SMALL_ACT_TYPES
    assert info.metadata["cgmq.portable"] == "true"
    read = verify.read_widths(info.path)
    assert read.loads and read.bops == cost.bops and read.weight_bytes == cost.weight_bytes
    assert info.parity.agreement >= 99.9


def test_portable_moves_a_uint4_input_of_an_int8_layer_into_uint8(tmp_path: Path, exported) -> None:
    plain = onnx_qdq.export_qdq(dict(CASES)["linear-uint4-into-int8"](), tmp_path / "plain.onnx", opset=21)
    assert TP.UINT4 in _act_types_into_8bit_weights(onnx.load(plain.path))
    _, portable = exported("linear-uint4-into-int8")
    assert _act_types_into_8bit_weights(onnx.load(portable.path)) == {TP.UINT8}
    second = next(l for l in portable.layers if l.bits_w == 8 and l.bits_a == 4)
    assert second.act_type == "uint8 (holds 4-bit)"


def test_portable_refuses_a_newer_opset(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="opset 21 or older"):
        onnx_qdq.export_qdq(dict(CASES)["conv-4"](), tmp_path / "m.onnx", opset=25, portable=True)
    assert not (tmp_path / "m.onnx").exists()


@needs_openvino
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_openvino_loads_every_portable_width_mix(name: str, exported) -> None:
    _, info = exported(name)
    result = openvino.compare(info.path, [l.node for l in info.layers])
    assert all(layer.layer_type is not None for layer in result.layers), result.layers
    assert result.agreement == 100.0 and not result.notes
    if name == "int8-cpu":  # OpenVINO runs cgmq's int8 file in int8 too
        assert all(layer.int8 for layer in result.layers), result.layers


@needs_openvino
def test_openvino_cannot_load_the_opset_25_int2_file_that_portable_avoids(tmp_path: Path) -> None:
    info = onnx_qdq.export_qdq(dict(CASES)["conv-2"](), tmp_path / "native.onnx", opset=25)
    assert TP.INT2 in {t.data_type for t in onnx.load(info.path).graph.initializer}
    with pytest.raises(CgmqError, match="OpenVINO cannot load native.onnx: .*Unsupported type") as refused:
        openvino.compare(info.path, [l.node for l in info.layers])
    assert refused.value.exit_code == 2 and "--portable" in refused.value.hint
