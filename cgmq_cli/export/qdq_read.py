"""Reading a QDQ graph: inferred shapes, tensor widths, MACs, weights and biases.

The rules (width of a tensor, MACs, bytes) are documented in
:mod:`cgmq_cli.export.verify`, which is their public face.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from cgmq_cli.errors import CgmqError
from cgmq_cli.export.qdq_types import FLOAT_BYTES, INTEGER_TYPES, RANGE_KEY, TYPE_BITS, bits_for_range, parse_range
from cgmq_cli.quant.functional import qrange

PASSTHROUGH = ("Identity", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")


class Graph:
    """Producers, constants, types and inferred shapes of one model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.consts: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.consts[node.output[0]] = node.attribute[0].t
        self.shapes: dict[str, list[int | None]] = {}
        self.types: dict[str, int] = {}
        for vi in (*graph.input, *graph.output, *graph.value_info):
            tt = vi.type.tensor_type
            self.types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        for name, t in self.consts.items():
            self.types[name] = t.data_type
            self.shapes[name] = list(t.dims)

    def const(self, name: str) -> np.ndarray | None:
        t = self.consts.get(name)
        return numpy_helper.to_array(t) if t is not None else None

    def back(self, name: str) -> str:
        """Walk back through layout-only ops and constant range bounds to the tensor that carries the values."""
        while name in self.producer:
            node = self.producer[name]
            if node.op_type in PASSTHROUGH or (node.op_type == "Clip" and self.is_const_bounded(node)):
                name = node.input[0]
            elif node.op_type in ("Max", "Min") and self.is_const_bounded(node):
                name = next(i for i in node.input if i not in self.consts)
            else:
                return name
        return name

    def is_const_bounded(self, node: onnx.NodeProto) -> bool:
        """A Clip/Max/Min of one tensor against constant scalar bounds (a range guard)."""
        if node.op_type == "Clip":
            return all(not i or (i in self.consts and self.const(i).size == 1) for i in node.input[1:])
        variable = [i for i in node.input if i not in self.consts]
        bounds = [i for i in node.input if i in self.consts]
        return len(node.input) == 2 and len(variable) == 1 and all(self.const(i).size == 1 for i in bounds)

    def macs(self, node: onnx.NodeProto, k: int | None, batch: int) -> int:
        """Output elements per example x the reduced dimension ``k`` (MACs of a compute node)."""
        out = self.shapes.get(node.output[0])
        if not out or any(d is None for d in out):
            raise CgmqError(f"cannot count the MACs of {node.op_type} node `{node.name}`: its output shape is not "
                            "static", "export the model with static shapes (only the batch dimension may be symbolic)")
        if k is None:
            raise CgmqError(f"cannot count the MACs of {node.op_type} node `{node.name}`: unknown weight shape",
                            "export the model with static shapes")
        return int(np.prod(out, dtype=np.int64)) * int(k) // batch

    def bias_add(self, node: onnx.NodeProto) -> str | None:
        """The constant of an ``Add`` that is the sole consumer of ``node`` (a MatMul's bias)."""
        users = self.consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == "Add":
            other = [i for i in users[0].input if i != node.output[0]]
            if other and self.origin_const(other[0]) is not None:
                return other[0]
        return None

    def bias_after(self, node: onnx.NodeProto) -> str | None:
        """The bias of an integer kernel with an int32 output: ``node -> Cast -> Mul(scale) -> Add(bias)``."""
        out = node.output[0]
        for op_type in ("Cast", "Mul"):
            users = self.consumers.get(out, [])
            if len(users) != 1 or users[0].op_type != op_type:
                return None
            out = users[0].output[0]
        users = self.consumers.get(out, [])
        if len(users) == 1 and users[0].op_type == "Add":
            other = [i for i in users[0].input if i != out]
            if other and self.origin_const(other[0]) is not None:
                return other[0]
        return None

    def origin_const(self, name: str) -> str | None:
        """The initializer a (weight) tensor is computed from, through DQ/Clip/layout ops and range guards."""
        while name not in self.consts:
            node = self.producer.get(name)
            if node is not None and node.op_type in ("Max", "Min") and self.is_const_bounded(node):
                name = next(i for i in node.input if i not in self.consts)
                continue
            if node is None or node.op_type not in (*PASSTHROUGH, "DequantizeLinear", "Clip", "Cast"):
                return None
            name = node.input[0]
        return name


def prepare(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Set a symbolic/1 batch to 1 and run shape inference; returns (model, batch to divide out)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    consts = {t.name for t in model.graph.initializer}
    batch = 1
    for vi in model.graph.input:
        if vi.name in consts or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 1:
            batch = batch if batch > 1 else dims[0].dim_value
        elif dims:
            dims[0].Clear()
            dims[0].dim_value = 1
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise CgmqError(f"ONNX shape inference failed: {str(exc).strip().splitlines()[0][:200]}",
                        "the file must be a valid ONNX model with inferable shapes") from None
    if _unknown_compute_shapes(model):
        _shapes_from_runtime(model)
    return model, batch


def _unknown_compute_shapes(model: onnx.ModelProto) -> bool:
    """Whether ONNX shape inference left the output shape of a compute node open (e.g. after com.microsoft ops)."""
    from cgmq_cli import ops

    known = {vi.name for vi in (*model.graph.value_info, *model.graph.output)
             if vi.type.tensor_type.HasField("shape")
             and all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)}
    return any(n.op_type in ops.ONNX_COMPUTE_TYPES and n.output and n.output[0] not in known
               for n in model.graph.node)


def _shapes_from_runtime(model: onnx.ModelProto) -> None:
    """Fill the type and shape of every node output by running the (batch 1) model once in onnxruntime.

    ONNX shape inference knows no com.microsoft ops (QGemm, QLinearAdd, its
    QuantizeLinear/DequantizeLinear, ...); onnxruntime runs them. Inputs are
    zeros; symbolic dimensions other than the batch are set to 1.
    """
    import onnxruntime as ort

    probe = onnx.ModelProto.FromString(model.SerializeToString())
    outputs = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in outputs:
                probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                outputs.add(name)
    consts = {t.name for t in probe.graph.initializer}
    feeds = {}
    for vi in probe.graph.input:
        if vi.name in consts:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        feeds[vi.name] = np.zeros(shape, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type or onnx.TensorProto.FLOAT))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        values = session.run(None, feeds)
    except Exception as exc:  # onnxruntime raises its own types
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CgmqError(f"cannot count the MACs: ONNX shape inference does not know some ops of the file, and "
                        f"onnxruntime cannot run it to measure the shapes: {first}",
                        "check that the file loads in onnxruntime") from None
    observed = {meta.name: value for meta, value in zip(session.get_outputs(), values)}
    observed = {name: v for name, v in observed.items() if isinstance(v, np.ndarray)}
    for out in model.graph.output:
        if out.name in observed:
            value = observed.pop(out.name)
            out.type.CopyFrom(onnx.helper.make_tensor_type_proto(onnx.helper.np_dtype_to_tensor_dtype(value.dtype),
                                                                 list(value.shape)))
    kept = [vi for vi in model.graph.value_info if vi.name not in observed]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    for name, value in observed.items():
        model.graph.value_info.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))


def type_bits(elem_type: int) -> int:
    if elem_type in TYPE_BITS:
        return TYPE_BITS[elem_type][0]
    return int(FLOAT_BYTES.get(elem_type, 4) * 8)


def _float_bounds(g: Graph, name: str) -> tuple[float | None, float | None]:
    """Constant scalar bounds of a Clip / Max / Min chain that produces ``name``."""
    low = high = None
    node = g.producer.get(name)
    while node is not None and node.op_type in ("Clip", "Max", "Min"):
        if node.op_type == "Clip":
            vals = [g.const(node.input[i]) if len(node.input) > i and node.input[i] else None for i in (1, 2)]
            data = node.input[0]
        else:
            consts = [(i, g.const(x)) for i, x in enumerate(node.input)]
            known = [(i, c) for i, c in consts if c is not None and c.size == 1]
            if len(node.input) != 2 or len(known) != 1:
                break
            data = node.input[1 - known[0][0]]
            vals = [known[0][1], None] if node.op_type == "Max" else [None, known[0][1]]
        if vals[0] is not None and vals[0].size == 1:
            low = float(vals[0].item()) if low is None else max(low, float(vals[0].item()))
        if vals[1] is not None and vals[1].size == 1:
            high = float(vals[1].item()) if high is None else min(high, float(vals[1].item()))
        node = g.producer.get(data)
    return low, high


def _dq_width(g: Graph, dq: onnx.NodeProto, notes: list[str]) -> int:
    src = dq.input[0]
    elem = g.types.get(src)
    if elem is None and len(dq.input) > 2 and dq.input[2]:
        elem = g.types.get(dq.input[2])
    elem = elem or onnx.TensorProto.UINT8  # QuantizeLinear's default output type
    if elem not in INTEGER_TYPES:
        return type_bits(elem)
    bits, signed = TYPE_BITS[elem]
    lo, hi = qrange(bits, signed)

    def narrow(a: float, b: float) -> None:
        nonlocal lo, hi
        if a <= b and max(lo, int(a)) <= min(hi, int(b)):
            lo, hi = max(lo, int(a)), min(hi, int(b))

    node = g.producer.get(src)
    while node is not None and node.op_type in ("Clip", "Identity"):  # rule 3a
        if node.op_type == "Clip":
            lo_c, hi_c = (g.const(node.input[i]) if len(node.input) > i and node.input[i] else None for i in (1, 2))
            narrow(lo_c.item() if lo_c is not None else lo, hi_c.item() if hi_c is not None else hi)
        src = node.input[0]
        node = g.producer.get(src)
    if node is not None and node.op_type == "QuantizeLinear":  # rule 3b
        scale = g.const(node.input[1])
        zero = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
        low, high = _float_bounds(g, node.input[0])
        if scale is not None and scale.size == 1 and float(scale.reshape(())) > 0 and (low, high) != (None, None):
            s, z = np.float32(scale.reshape(())), int(np.asarray(zero, dtype=np.int64).reshape(-1)[0])
            a = float(np.round(np.float32(low) / s)) + z if low is not None else lo
            b = float(np.round(np.float32(high) / s)) + z if high is not None else hi
            narrow(a, b)
    marker = next((p.value for p in dq.metadata_props if p.key == RANGE_KEY), None)
    codes = g.const(src)
    if marker is not None and codes is not None:  # rule 3c
        rng = parse_range(marker)
        if rng is None:
            notes.append(f"malformed {RANGE_KEY} marker {marker!r} ignored")
        elif codes.size and (int(codes.min()) < rng[0] or int(codes.max()) > rng[1]):
            notes.append(f"{RANGE_KEY}={marker} contradicted by the stored codes: counted at the type width")
        else:
            narrow(*rng)
    return min(bits, bits_for_range(lo, hi, signed))


def tensor_width(g: Graph, name: str, notes: list[str]) -> tuple[int, int | None, bool]:
    """(bits, element type of the integer codes or None, narrowed) of a compute input."""
    src = g.back(name)
    node = g.producer.get(src)
    if node is not None and node.op_type == "DequantizeLinear":
        elem = g.types.get(node.input[0])
        bits = _dq_width(g, node, notes)
        return bits, elem, elem in TYPE_BITS and bits != TYPE_BITS[elem][0]
    return type_bits(g.types.get(src, onnx.TensorProto.FLOAT)), None, False


def integer_width(elem_type: int | None) -> tuple[int, int, bool] | None:
    """(bits, element type, narrowed=False) of an integer kernel's operand of type ``elem_type``; None if unknown."""
    if elem_type is None or elem_type not in TYPE_BITS:
        return None
    return TYPE_BITS[elem_type][0], elem_type, False


def tensor_bytes(g: Graph, name: str | None, bits: int, seen: set[str]) -> float:
    origin = g.origin_const(name) if name else None
    if origin is None or origin in seen:
        return 0.0
    seen.add(origin)
    return int(np.prod(g.consts[origin].dims, dtype=np.int64)) * bits / 8
