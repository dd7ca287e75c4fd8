"""QDQ ONNX export end to end: torch.onnx + Q/DQ insertion, onnxruntime loading, parity, verify.

Parity tolerance: onnxruntime and PyTorch compute the same integer grids, so
they differ only where float accumulation order flips a rounding decision of
an activation code. One flipped input code of the last layer moves an output
by at most s_a * max|W|; the tests allow two such steps (plus float noise).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper
from torch import nn

from cgmq_cli import qmodel
from cgmq_cli.errors import CheckFailedError, ExportError, ParityError
from cgmq_cli.export import onnx_qdq, verify
from cgmq_cli.export.qdq_types import NATIVE_TYPES, RANGE_KEY

WIDTHS = (2, 4, 8, 16)
KINDS = ("conv", "depthwise", "conv1d", "linear")


def _build(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if kind == "conv":  # pooling between the layers: the Q after MaxPool is the tricky case;
        # no conv bias + fresh BN folds to an all-zero bias, which torch.onnx would drop
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 6, 3), nn.Flatten()), (3, 8, 8)
    if kind == "depthwise":
        return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(),
                             nn.Conv2d(4, 4, 3, groups=4), nn.Flatten()), (4, 8, 8)
    if kind == "conv1d":
        return nn.Sequential(nn.Conv1d(4, 6, 3), nn.ReLU(), nn.Conv1d(6, 5, 3), nn.Flatten()), (4, 12)
    return nn.Sequential(nn.Flatten(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10)), (2, 4, 4)


@pytest.fixture(scope="module")
def prepared() -> dict[str, qmodel.QuantizedModel]:
    out = {}
    for kind in KINDS:
        model, shape = _build(kind)
        qm = qmodel.prepare(model, shape)
        qm.calibrate(torch.rand(64, *shape))
        out[kind] = qm
    return out


def _set(qm: qmodel.QuantizedModel, bits: int) -> None:
    qm.set_bits({layer.name: (bits, 8 if layer.takes_network_input else bits) for layer in qm.layers})


def _inputs(qm: qmodel.QuantizedModel, n: int = 32) -> list[torch.Tensor]:
    return [torch.rand(n, *qm.sample_shape, generator=torch.Generator().manual_seed(1))]


def _tolerance(qm: qmodel.QuantizedModel) -> float:
    name = qm.layers[-1].name
    wq, aq = qm.quantizers()[name]
    weight = qm.gm.get_parameter(f"{name}.weight").detach()
    step = float(aq.step(aq.bits).detach()) if aq.bits < 32 else 0.0
    return 2 * step * float(weight.abs().max()) + 1e-5


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ------------------------------------------------- widths x layer kinds ---


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", WIDTHS)
def test_export_width_and_kind(prepared, tmp_path: Path, kind: str, bits: int) -> None:
    qm = prepared[kind]
    _set(qm, bits)
    info = onnx_qdq.export_qdq(qm, tmp_path / "m.onnx", parity_inputs=_inputs(qm))
    model = onnx.load(info.path)
    ops = _ops(model)
    compute = "MatMul" if kind == "linear" else "Conv"
    act_bits = [8 if layer.takes_network_input else bits for layer in qm.layers]
    # two layers: two weight DQs, two activation Q/DQ pairs (a network input stays 8-bit)
    assert ops[compute] == 2 and "Gemm" not in ops
    assert ops["DequantizeLinear"] == 4 and ops["QuantizeLinear"] == 2
    # a Max/Min range guard before each non-8-bit Q, and after each 8-bit input's DQ: the generic profile
    # runs no integer kernels, so onnxruntime must not fuse any layer (its U8S8 kernels saturate on CPUs
    # without VNNI)
    # without VNNI); and a MatMul reads its weight through a guard too (no MatMulNBits, see qdq_rewrite)
    guards = sum(b != 8 for b in act_bits) + sum(b == 8 for b in act_bits) + (2 if kind == "linear" else 0)
    assert ops.get("Max", 0) == ops.get("Min", 0) == guards
    assert ops.get("Add", 0) == (2 if kind == "linear" else 0)  # linear bias after the MatMul
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"} and info.opset == 25

    inits = {t.name: t for t in model.graph.initializer}
    for layer in qm.layers:
        codes = inits[f"{layer.name}.weight{'_t' if kind == 'linear' else ''}_q"]
        assert codes.data_type == NATIVE_TYPES[(bits, True)]
        dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == codes.name)
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        assert axis == (1 if kind == "linear" else 0)  # per output channel, in the consumer's layout
        assert list(inits[dq.input[1]].dims) == [layer.weight_shape[0]]
    for layer, b in zip(qm.layers, act_bits):  # inputs are non-negative (rand, ReLU): unsigned grids
        assert inits[f"{layer.act_keys[0]}/zero_point"].data_type == NATIVE_TYPES[(b, False)]

    assert info.parity.agreement >= 99.9 and info.parity.n == 32
    assert info.parity.max_abs_diff <= _tolerance(qm)
    result = verify.read_widths(info.path)
    assert result.loads is True
    assert result.bops == qm.cost().bops  # exactly, to the integer
    assert result.weight_bytes == qm.cost().weight_bytes
    assert [(r.node, r.bits_w, r.bits_a) for r in result.layers] == [
        (layer.name, bits, b) for layer, b in zip(qm.layers, act_bits)]
    assert info.metadata["cgmq.version"] and '"bops"' in info.metadata["cgmq.cost"]


# ------------------------------------------------------- older opsets -----


@pytest.mark.parametrize("opset", [21, 17, 13])  # 13: onnx's converter has no 14 -> 13 adapter (Relu); relabelled
def test_older_opsets_load_and_match(prepared, tmp_path: Path, opset: int) -> None:
    qm = prepared["conv"]
    first, second = qm.layers
    qm.set_bits({first.name: (2, 8), second.name: (4, 2)})
    info = onnx_qdq.export_qdq(qm, tmp_path / "m.onnx", opset=opset, parity_inputs=_inputs(qm))
    model = onnx.load(info.path)
    assert next(o.version for o in model.opset_import if o.domain == "") == opset
    inits = {t.name: t for t in model.graph.initializer}
    container = TP.INT4 if opset >= 21 else TP.INT8
    assert inits[f"{first.name}.weight_q"].data_type == container  # 2-bit weight in a wider container
    assert inits[f"{second.name}.weight_q"].data_type == (TP.INT4 if opset >= 21 else TP.INT8)
    markers = {n.input[0]: dict((p.key, p.value) for p in n.metadata_props)
               for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert markers[f"{first.name}.weight_q"] == {RANGE_KEY: "-2,1"}
    if opset < 21:
        assert _ops(model).get("Clip", 0) == 1  # the 2-bit activation's integer Clip
    assert info.parity.agreement >= 99.9 and info.parity.max_abs_diff <= _tolerance(qm)
    result = verify.read_widths(info.path)
    assert result.loads is True and result.bops == qm.cost().bops
    assert [(r.bits_w, r.bits_a) for r in result.layers] == [(2, 8), (4, 2)]


def test_16_bit_needs_opset_21_and_leaves_no_file(prepared, tmp_path: Path) -> None:
    qm = prepared["conv1d"]
    _set(qm, 16)
    with pytest.raises(ExportError, match="opset 21"):
        onnx_qdq.export_qdq(qm, tmp_path / "m.onnx", opset=17)
    assert os.listdir(tmp_path) == []


def test_failed_parity_leaves_no_file(prepared, tmp_path: Path) -> None:
    qm = prepared["linear"]
    _set(qm, 8)
    with pytest.raises(ParityError, match="top-1"):
        onnx_qdq.export_qdq(qm, tmp_path / "m.onnx", parity_inputs=_inputs(qm, 4), min_agreement=100.1)
    assert os.listdir(tmp_path) == []


def test_fused_kernels_that_round_differently_do_not_refuse_a_file_whose_exact_meaning_agrees(
        prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime's integer kernels requantize with their own rounding (a 2-bit digits model: 1 of 360 top-1
    predictions flipped, while the file with graph optimizations off matched PyTorch to 4e-6). The file is
    judged by its exact meaning; the fused agreement is kept beside it."""
    qm = prepared["linear"]
    _set(qm, 2)
    real = verify.parity
    calls = []

    def parity(qm_, path, inputs, optimize=True):
        calls.append(optimize)
        res = real(qm_, path, inputs, optimize=optimize)
        return res if not optimize else verify.ParityResult(99.5, 0.6, 0.1, res.n)  # as the fused session did

    monkeypatch.setattr(verify, "parity", parity)
    info = onnx_qdq.export_qdq(qm, tmp_path / "m.onnx", parity_inputs=_inputs(qm))
    assert calls == [True, False] and (tmp_path / "m.onnx").exists()
    assert info.parity.agreement == 99.5 and info.parity.file_agreement >= 99.9
    assert info.parity.file_max_abs_diff <= _tolerance(qm) and info.as_dict()["parity"]["file_agreement"] >= 99.9
    session = verify.load_session(tmp_path / "m.onnx", optimize=False)
    assert "DISABLE_ALL" in str(session.get_session_options().graph_optimization_level)


def test_a_file_that_disagrees_without_fusion_is_refused(prepared, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    qm = prepared["linear"]
    _set(qm, 8)
    monkeypatch.setattr(verify, "parity", lambda qm_, path, inputs, optimize=True:
                        verify.ParityResult(99.0 if optimize else 98.0, 1.0, 0.5, 32))
    with pytest.raises(ParityError, match=r"98.00% .* graph optimizations off and 99.00%"):
        onnx_qdq.export_qdq(qm, tmp_path / "m.onnx", parity_inputs=_inputs(qm))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------- any traceable model ------


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(16 * 4 * 4, 10)
        nn.init.zeros_(self.fc.bias)  # an all-zero bias must survive the export

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.pw(torch.relu(self.dw(x)))
        x = torch.cat([nn.functional.max_pool2d(x, 2), nn.functional.avg_pool2d(x, 2)], 1)
        return self.fc(x.flatten(1))


def test_residual_concat_pool_model_at_mixed_widths(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qm = qmodel.prepare(Residual(), (1, 8, 8))
    qm.calibrate(torch.rand(64, 1, 8, 8))
    qm.set_bits({"stem": (4, 8), "dw": (2, 4), "pw": (32, 16), "fc": (8, 32)})
    info = onnx_qdq.export_qdq(qm, tmp_path / "r.onnx", metadata={"budget": {"bops": 10**9}},
                               parity_inputs=_inputs(qm))
    assert info.parity.agreement >= 99.9
    result = verify.read_widths(info.path)
    assert result.loads and result.bops == qm.cost().bops and result.weight_bytes == qm.cost().weight_bytes
    assert {r.node: (r.bits_w, r.bits_a) for r in result.layers} == {
        "stem": (4, 8), "dw": (2, 4), "pw": (32, 16), "fc": (8, 32)}
    assert info.metadata["cgmq.budget"] == '{"bops": 1000000000}'
    verify.check_budget(result, bops=10**9)


class Sequence(nn.Module):
    """Linear layers on 3-D inputs (MatMul + Add), a layer called twice, concat, mean."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(12, 5)
        nn.init.zeros_(self.mix.bias)

    def forward(self, x):
        y = torch.relu(self.conv(x)).transpose(1, 2)
        z = self.mix(torch.relu(self.mix(y)))
        return self.head(torch.cat([y, z], -1)).mean(1)


@pytest.mark.parametrize("opset", [25, 17])
def test_sequence_model_with_a_shared_layer(tmp_path: Path, opset: int) -> None:
    torch.manual_seed(0)
    qm = qmodel.prepare(Sequence(), (4, 10))
    qm.calibrate(torch.randn(64, 4, 10))
    # each call site reads its own input tensor, so each has its own input width; the weight is one
    qm.set_bits({"conv": (8, 8), "mix": (2, 4), "mix#1": (2, 4), "head": (4, 2)})
    info = onnx_qdq.export_qdq(qm, tmp_path / "s.onnx", opset=opset,
                               parity_inputs=[torch.randn(32, 4, 10, generator=torch.Generator().manual_seed(1))])
    assert info.parity.agreement >= 99.9
    result = verify.read_widths(info.path)
    assert result.loads and result.bops == qm.cost().bops and result.weight_bytes == qm.cost().weight_bytes
    assert [(r.node, r.op, r.bits_w, r.bits_a) for r in result.layers] == [
        ("conv", "Conv", 8, 8), ("mix", "MatMul", 2, 4), ("mix#1", "MatMul", 2, 4), ("head", "MatMul", 4, 2)]
    model = onnx.load(info.path)
    weights = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and "weight" in n.name]
    assert weights.count("mix.weight_t_q") == 2  # both call sites read one stored weight


# ------------------------------------------- tampering, sizes, latency ----


def test_tampered_export_is_caught_over_budget(prepared, tmp_path: Path) -> None:
    qm = prepared["conv"]
    _set(qm, 4)
    info = onnx_qdq.export_qdq(qm, tmp_path / "m.onnx", parity_inputs=_inputs(qm, 8))
    budget = qm.cost().bops
    verify.check_budget(verify.read_widths(info.path, runtime=False), bops=budget)
    model = onnx.load(info.path)
    name = f"{qm.layers[1].name}.weight"
    for suffix in ("_q", "_zero_point"):  # widen the weight to int8 after export (same codes)
        i = [t.name for t in model.graph.initializer].index(name + suffix)
        arr = numpy_helper.to_array(model.graph.initializer[i]).astype(np.int8)
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, name + suffix))
    onnx.save(model, tmp_path / "tampered.onnx")
    tampered = verify.read_widths(tmp_path / "tampered.onnx")
    assert tampered.loads is True  # still a valid file, just wider
    assert tampered.layers[1].bits_w == 8 and tampered.bops > budget
    with pytest.raises(CheckFailedError, match="over budget"):
        verify.check_budget(tampered, bops=budget)


def test_file_size_shrinks_with_widths_and_float_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qm = qmodel.prepare(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)), (64,))
    qm.calibrate(torch.rand(64, 64))
    sizes = {}
    for bits in WIDTHS:
        _set(qm, bits)
        sizes[bits] = onnx_qdq.export_qdq(qm, tmp_path / f"m{bits}.onnx", parity_inputs=_inputs(qm, 8)).size_bytes
    floating = onnx_qdq.export_float(qm, tmp_path / "float.onnx")
    assert floating.size_bytes > sizes[16] > sizes[8] > sizes[4] > sizes[2]
    params = sum(layer.params for layer in qm.layers)
    assert sizes[2] < params  # well under one byte per weight
    result = verify.read_widths(floating.path)
    assert result.loads and all((r.bits_w, r.bits_a) == (32, 32) for r in result.layers)
    assert result.bops == sum(s.macs for s in qm.shapes) * 32 * 32
    example = torch.rand(1, 64)
    assert verify.latency(floating.path, example, repeats=3) > 0
    assert verify.latency(tmp_path / "m8.onnx", example, repeats=3) > 0


# ------------------------------------- onnxruntime behaviour (lint, pitfalls) --


@pytest.mark.parametrize("integer", [True, False])
def test_lint_reports_integer_kernels_for_8_bit_only(tmp_path: Path, integer: bool) -> None:
    """On a profile with integer kernels, 8-bit int8 x uint8 convs whose output is re-quantized run
    as QLinearConv on x86; any other width, and every layer of a profile without integer kernels,
    dequantizes. Fails if a newer onnxruntime changes that."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 4, 3), nn.Flatten())
    qm = qmodel.prepare(net, (3, 8, 8), integer_ops=("conv",) if integer else (), reduce_range=integer)
    qm.calibrate(torch.rand(64, 3, 8, 8))
    for bits in (8, 4):
        _set(qm, bits)
        info = onnx_qdq.export_qdq(qm, tmp_path / f"m{bits}.onnx", parity_inputs=_inputs(qm, 8))
        rows = verify.read_widths(info.path).layers
        assert all(r.int_candidate == (bits == 8) for r in rows)
        if bits == 8 and integer:
            assert [r.kernel for r in rows[:2]] == ["QLinearConv", "QLinearConv"]
            assert rows[0].lint == "integer kernel (QLinearConv)"
            assert rows[2].lint.startswith("dequantize + float")  # float output: no output Q
        else:
            assert all(r.lint.startswith("dequantize + float") for r in rows)


def _pitfall(case: str, guarded: bool) -> bytes:
    """A minimal graph of one onnxruntime 1.32 load failure, raw or the way cgmq writes it."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def qdq(x, tag, dtype, guard_before=False, guard_after=False):
        s, z = const(f"{tag}_s", np.array(0.05, np.float32)), const(f"{tag}_z", np.zeros((), dtype))
        hi = float(np.iinfo(np.uint8).max if dtype == np.uint8 else 3) * 0.05
        if guard_before:
            x = _guard(x, f"{tag}_pre", hi)
        nodes.extend([helper.make_node("QuantizeLinear", [x, s, z], [f"{tag}_q"]),
                      helper.make_node("DequantizeLinear", [f"{tag}_q", s, z], [f"{tag}_dq"])])
        return _guard(f"{tag}_dq", f"{tag}_post", hi) if guard_after else f"{tag}_dq"

    def _guard(x, tag, hi):
        lo_c, hi_c = const(f"{tag}_lo", np.array(0.0, np.float32)), const(f"{tag}_hi", np.array(hi, np.float32))
        nodes.extend([helper.make_node("Max", [x, lo_c], [f"{tag}_a"]),
                      helper.make_node("Min", [f"{tag}_a", hi_c], [tag])])
        return tag

    def weight(shape, axis):
        w = const("w", rng.integers(-2, 2, size=shape).astype(ml_dtypes.int2))
        s, z = const("ws", np.full(shape[axis], 0.01, np.float32)), const("wz", np.zeros(shape[axis], ml_dtypes.int2))
        nodes.append(helper.make_node("DequantizeLinear", [w, s, z], ["wd"], axis=axis))
        return "wd"

    if case == "gemm-2bit":  # Gemm with 2-bit operands (QGemm fusion) vs. cgmq's MatMul layout
        a = qdq("x", "a", ml_dtypes.uint2)
        if guarded:
            nodes.append(helper.make_node("MatMul", [a, weight((16, 5), 1)], ["y"]))
        else:
            nodes.append(helper.make_node("Gemm", [a, weight((5, 16), 0)], ["y"], transB=1))
        x_shape, y_shape = ["N", 16], ["N", 5]
    elif case == "maxpool-q2":  # Q(uint2) after MaxPool (Q propagated onto MaxPool)
        nodes.append(helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]))
        a = qdq("p", "a", ml_dtypes.uint2, guard_before=guarded)
        nodes.append(helper.make_node("Conv", [a, weight((4, 3, 3, 3), 0)], ["y"]))
        x_shape, y_shape = ["N", 3, 8, 8], ["N", 4, 2, 2]
    else:  # "conv-int2-u8": uint8 input, int2 weight, uint8 output Q (QLinearConv fusion)
        a = qdq("x", "a", np.uint8, guard_after=guarded)
        nodes.append(helper.make_node("Conv", [a, weight((4, 3, 3, 3), 0)], ["c"]))
        nodes.append(helper.make_node("Relu", ["c"], ["r"]))
        qdq("r", "o", np.uint8)
        nodes.append(helper.make_node("Identity", ["o_dq"], ["y"]))
        x_shape, y_shape = ["N", 3, 8, 8], ["N", 4, 6, 6]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TP.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


@pytest.mark.parametrize("case", ["gemm-2bit", "maxpool-q2", "conv-int2-u8"])
def test_onnxruntime_pitfalls_and_the_way_around(tmp_path: Path, case: str) -> None:
    """The pattern cgmq writes must load; the raw pattern fails on onnxruntime 1.32.

    If the first assertion fails, a newer onnxruntime broke the workaround; if
    only the second does, it fixed the pitfall and the workaround may go.
    """
    import onnxruntime as ort

    (tmp_path / "ours.onnx").write_bytes(_pitfall(case, guarded=True))
    session = verify.load_session(tmp_path / "ours.onnx")
    x = np.random.default_rng(0).random([2, 16] if case == "gemm-2bit" else [2, 3, 8, 8]).astype(np.float32)
    session.run(None, {"x": x})
    (tmp_path / "raw.onnx").write_bytes(_pitfall(case, guarded=False))
    if not ort.__version__.startswith("1.32."):
        pytest.skip(f"pitfall measured on onnxruntime 1.32; this is {ort.__version__}")
    with pytest.raises(ExportError, match="cannot load"):
        verify.load_session(tmp_path / "raw.onnx")
