"""Unit tests for the QDQ type rules and `verify` on hand-built ONNX files (no torch export)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from cgmq_cli.errors import CheckFailedError, ExportError
from cgmq_cli.export import qdq_types, verify
from cgmq_cli.export.qdq_types import RANGE_KEY, bits_for_range, parse_range, storage

# ------------------------------------------------------------ type rules ---


@pytest.mark.parametrize("bits,signed,opset,elem,container", [
    (2, True, 25, TP.INT2, 2), (2, False, 25, TP.UINT2, 2),
    (2, True, 21, TP.INT4, 4), (2, False, 24, TP.UINT4, 4),
    (2, True, 17, TP.INT8, 8), (4, False, 20, TP.UINT8, 8),
    (4, True, 21, TP.INT4, 4), (8, False, 13, TP.UINT8, 8),
    (16, True, 21, TP.INT16, 16), (16, False, 25, TP.UINT16, 16),
])
def test_storage_native_and_containers(bits, signed, opset, elem, container) -> None:
    st = storage(bits, signed, opset)
    assert (st.elem_type, st.container_bits, st.bits) == (elem, container, bits)
    assert st.is_container == (container != bits)
    assert st.clip == (None if container == bits else ("int" if container == 8 else "float"))


def test_storage_float_and_errors() -> None:
    assert storage(32, True, 25) is None
    with pytest.raises(ExportError, match="16-bit.*opset 21"):
        storage(16, True, 17, "the weight of layer `fc`")
    with pytest.raises(ExportError, match="no ONNX integer type"):
        storage(3, True, 25)


@pytest.mark.parametrize("lo,hi,signed,bits", [
    (-2, 1, True, 2), (-8, 7, True, 4), (-2, 2, True, 3), (0, 3, False, 2), (0, 255, False, 8),
    (-128, 127, True, 8), (0, 0, False, 1), (-32768, 32767, True, 16), (0, 15, False, 4),
])
def test_bits_for_range(lo, hi, signed, bits) -> None:
    assert bits_for_range(lo, hi, signed) == bits


def test_parse_range() -> None:
    assert parse_range("-2,1") == (-2, 1)
    assert parse_range("3,1") is None and parse_range("a,b") is None and parse_range("1") is None


# ------------------------------------------------------ hand-built files ---

RNG = np.random.default_rng(0)


class Builder:
    """A tiny QDQ graph builder on onnx.helper (the way another tool would write a file)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, name: str = "", **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=name or output, **attrs))
        return output

    def qdq(self, x: str, tag: str, dtype, scale: float = 0.05, int_clip=None, float_guard=None) -> str:
        s = self.const(f"{tag}_s", np.array(scale, np.float32))
        z = self.const(f"{tag}_z", np.zeros((), dtype))
        if float_guard is not None:
            lo = self.const(f"{tag}_lo", np.array(float_guard[0] * scale, np.float32))
            hi = self.const(f"{tag}_hi", np.array(float_guard[1] * scale, np.float32))
            x = self.node("Min", [self.node("Max", [x, lo], f"{tag}_max"), hi], f"{tag}_min")
        q = self.node("QuantizeLinear", [x, s, z], f"{tag}_q")
        if int_clip is not None:
            lo = self.const(f"{tag}_clo", np.array(int_clip[0], dtype))
            hi = self.const(f"{tag}_chi", np.array(int_clip[1], dtype))
            q = self.node("Clip", [q, lo, hi], f"{tag}_qc")
        return self.node("DequantizeLinear", [q, s, z], f"{tag}_dq")

    def weight(self, tag: str, shape, dtype, lo: int, hi: int, axis: int, marker: str | None = None) -> str:
        codes = self.const(f"{tag}_w", RNG.integers(lo, hi + 1, size=shape).astype(dtype))
        n = shape[axis]
        s = self.const(f"{tag}_ws", np.full(n, 0.01, np.float32))
        z = self.const(f"{tag}_wz", np.zeros(n, dtype))
        out = self.node("DequantizeLinear", [codes, s, z], f"{tag}_wdq", axis=axis)
        if marker is not None:
            helper.set_metadata_props(self.nodes[-1], {RANGE_KEY: marker})
        return out

    def model(self, out: str, out_shape, batch="N", opset: int = 25) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "hand", [helper.make_tensor_value_info("x", TP.FLOAT, [batch, 3, 8, 8])],
                                  [helper.make_tensor_value_info(out, TP.FLOAT, [batch, *out_shape])], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        onnx.checker.check_model(model, full_check=True)
        return model


def hand_built(batch="N") -> onnx.ModelProto:
    """x -> QDQ(uint8) -> Conv(int4 W) -> Relu -> Flatten -> QDQ(uint4) -> MatMul(int2 W) + bias -> float Gemm."""
    import ml_dtypes

    b = Builder()
    a0 = b.qdq("x", "a0", np.uint8)
    w0 = b.weight("c", (8, 3, 3, 3), ml_dtypes.int4, -8, 7, axis=0)
    conv = b.node("Conv", [a0, w0, b.const("c_b", np.zeros(8, np.float32))], "conv", pads=[1, 1, 1, 1])
    flat = b.node("Flatten", [b.node("Relu", [conv], "relu")], "flat", axis=1)
    a1 = b.qdq(flat, "a1", ml_dtypes.uint4)
    w1 = b.weight("m", (512, 10), ml_dtypes.int2, -2, 1, axis=1)
    mm = b.node("MatMul", [a1, w1], "mm")
    add = b.node("Add", [mm, b.const("m_b", np.zeros(10, np.float32))], "add")
    out = b.node("Gemm", [add, b.const("g_w", RNG.normal(size=(5, 10)).astype(np.float32)),
                          b.const("g_b", np.zeros(5, np.float32))], "out", transB=1)
    return b.model(out, [5], batch)


# Hand-computed: MACs = output elements per example x K.
CONV_MACS = 8 * 8 * 8 * (3 * 3 * 3)  # 13824
MM_MACS = 10 * 512  # 5120
GEMM_MACS = 5 * 10  # 50
HAND_BOPS = CONV_MACS * 4 * 8 + MM_MACS * 2 * 4 + GEMM_MACS * 32 * 32  # 442368 + 40960 + 51200
HAND_BYTES = (216 * 4 / 8 + 8 * 4) + (5120 * 2 / 8 + 10 * 4) + (50 * 4 + 5 * 4)  # 140 + 1320 + 220


def test_verify_hand_built_file(tmp_path: Path) -> None:
    path = tmp_path / "hand.onnx"
    onnx.save(hand_built(), path)
    result = verify.read_widths(path)
    rows = {r.node: r for r in result.layers}
    assert [(r.op, r.macs, r.bits_w, r.bits_a) for r in result.layers] == [
        ("Conv", CONV_MACS, 4, 8), ("MatMul", MM_MACS, 2, 4), ("Gemm", GEMM_MACS, 32, 32)]
    assert rows["conv"].bops == 442368 and rows["mm"].bops == 40960 and rows["out"].bops == 51200
    assert result.bops == HAND_BOPS == 534528
    assert result.weight_bytes == HAND_BYTES == 1680
    assert result.macs == CONV_MACS + MM_MACS + GEMM_MACS
    assert result.loads is True  # onnxruntime default options; lint ran
    assert all(r.kernel is not None and r.lint for r in result.layers)
    assert not any(r.int_candidate for r in result.layers)


def test_verify_counts_per_example_with_a_fixed_batch() -> None:
    fixed = verify.read_widths(hand_built(batch=4), runtime=False)
    assert fixed.bops == HAND_BOPS and fixed.weight_bytes == HAND_BYTES
    one = verify.read_widths(hand_built(batch=1), runtime=False)
    assert one.bops == HAND_BOPS


def container_model(opset: int, weight_codes=None, marker: str | None = "-2,1") -> onnx.ModelProto:
    """2-bit activations and weights in containers: int8 + Clip (opset 17) or int4 + Max/Min guard (21)."""
    import ml_dtypes

    b = Builder()
    if opset < 21:
        a = b.qdq("x", "a", np.uint8, int_clip=(0, 3))
        wtype = np.int8
    else:
        a = b.qdq("x", "a", ml_dtypes.uint4, float_guard=(0, 3))
        wtype = ml_dtypes.int4
    w = b.weight("c", (4, 3, 3, 3), wtype, -2, 1, axis=0, marker=marker)
    if weight_codes is not None:
        b.inits[[t.name for t in b.inits].index("c_w")] = numpy_helper.from_array(weight_codes.astype(wtype), "c_w")
    out = b.node("Conv", [a, w], "conv")
    return b.model(out, [4, 6, 6], opset=opset)


@pytest.mark.parametrize("opset", [17, 21])
def test_verify_reads_containers_at_their_true_width(opset: int) -> None:
    result = verify.read_widths(container_model(opset), runtime=False)
    (row,) = result.layers
    macs = 4 * 6 * 6 * 27
    assert (row.bits_w, row.bits_a, row.macs, row.bops) == (2, 2, macs, macs * 4)
    assert row.weight_bytes == 108 * 2 / 8
    assert not row.int_candidate


@pytest.mark.parametrize("opset", [17, 21])
def test_verify_without_hints_counts_the_type_width(opset: int) -> None:
    model = container_model(opset, marker=None)
    if opset < 21:  # drop the integer Clip too: nothing says the range is narrow any more
        clip = next(n for n in model.graph.node if n.op_type == "Clip")
        dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == clip.output[0])
        dq.input[0] = clip.input[0]
        model.graph.node.remove(clip)
        expected_a = 8
    else:  # the Max/Min guard is still there and still proves the activation range
        expected_a = 2
    (row,) = verify.read_widths(model, runtime=False).layers
    assert row.bits_w == (8 if opset < 21 else 4)
    assert row.bits_a == expected_a


def test_verify_ignores_a_marker_that_the_codes_contradict() -> None:
    codes = RNG.integers(-2, 2, size=(4, 3, 3, 3))
    codes[0, 0, 0, 0] = 7  # a 4-bit code behind a "-2,1" marker
    (row,) = verify.read_widths(container_model(21, weight_codes=codes), runtime=False).layers
    assert row.bits_w == 4
    assert any("contradicted" in note for note in row.notes)


def test_tampered_hand_built_file_is_over_budget(tmp_path: Path) -> None:
    model = hand_built()
    budget = verify.read_widths(model, runtime=False)
    verify.check_budget(budget, bops=budget.bops, weight_bytes=budget.weight_bytes)  # exactly at budget: fine
    # widen the MatMul weight from int2 to int8 (same codes), as an edit after export would
    for name in ("m_w", "m_wz"):
        i = [t.name for t in model.graph.initializer].index(name)
        arr = numpy_helper.to_array(model.graph.initializer[i]).astype(np.int8)
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, name))
    tampered = verify.read_widths(model, runtime=False)
    assert tampered.bops == budget.bops + MM_MACS * (8 - 2) * 4
    with pytest.raises(CheckFailedError, match="over budget: BOPs") as err:
        verify.check_budget(tampered, bops=budget.bops)
    assert err.value.exit_code == 4
    with pytest.raises(CheckFailedError, match="weight bytes"):
        verify.check_budget(tampered, weight_bytes=budget.weight_bytes)


def test_check_budget_passes_without_limits() -> None:
    verify.check_budget(verify.read_widths(hand_built(), runtime=False))


def test_verify_rejects_unreadable_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(Exception, match="cannot read"):
        verify.read_widths(bad)


def test_type_table_covers_every_native_type() -> None:
    for (bits, signed), elem in qdq_types.NATIVE_TYPES.items():
        assert qdq_types.TYPE_BITS[elem] == (bits, signed)
