"""The integer-kernel guarantee: does onnxruntime run what the profile promises as integer kernels, and if not, why.

A profile with ``integer_ops`` promises that its target runs those ops as
integer kernels. In a QDQ file that promise covers:

* every compute node (Conv; Gemm / MatMul for ``linear``) whose weight and
  input are both 8 bits wide (read back as ``cgmq verify`` reads them),
  except a Conv that produces a network output: cgmq keeps network outputs
  float, and onnxruntime's QLinearConv needs a quantized output (QGemm and
  MatMulIntegerToFloat do not, so a final linear layer is promised);
* every residual Add (two activation operands), Concat and pooling node
  (AveragePool, GlobalAveragePool, MaxPool) whose operands and output are all
  8-bit quantized tensors.

:func:`check` loads the file in onnxruntime (CPU, default options), reads the
graph its optimiser wrote and finds each promised node there (by name: the
QDQ fusions keep the target node's name, the layout pass appends
``_token_N``). A node that did not become an integer kernel gets a reason,
found by :func:`blocked_by` from onnxruntime's QDQ selector rules
(onnxruntime/core/optimizer/qdq_transformer/selectors_actions/qdq_selectors.cc,
as of 1.32), restated:

* every data input comes straight from a DequantizeLinear that is not a graph
  output (a DQ read by several nodes is fine: onnxruntime duplicates it);
* the output goes, optionally through one Relu or Clip that the Q makes
  redundant (a Relu only when the Q's zero point is the type's minimum), to
  exactly one QuantizeLinear, its only reader, and is no graph output; Gemm
  and MatMul may instead keep a float output (QGemm, MatMulIntegerToFloat);
* types: the input and output types are equal (Add, Concat and pooling: all of
  them); an int8 input needs an int8 weight; no 4- or 16-bit operands;
  a bias is int32 behind a DequantizeLinear, or a float initializer that
  onnxruntime quantizes itself (only when the input has one scale and the
  output reaches a QuantizeLinear without branching);
* MaxPool runs on the quantized type only when its Q and DQ share scale and
  zero point and the scale is positive.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from cgmq_cli import ops
from cgmq_cli.errors import CgmqError, CheckFailedError
from cgmq_cli.export.lint import load_session
from cgmq_cli.export.qdq_read import PASSTHROUGH, Graph, prepare, tensor_width
from cgmq_cli.export.qdq_types import TYPE_BITS

INTEGER_TENSOR_KERNELS = frozenset({"QLinearAdd", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool"})
INTEGER_COMPUTE_KERNELS = frozenset({"QLinearConv", "NhwcQLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat",
                                     "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul"})
MAXPOOL = ("MaxPool", "NhwcMaxPool")
TENSOR_KINDS = {"Add": "add", "Concat": "concat", "AveragePool": "pooling", "GlobalAveragePool": "pooling",
                "MaxPool": "pooling"}
_TOKEN = re.compile(r"(_token_\d+)+$")


@dataclass(frozen=True)
class Finding:
    """One node the profile promises as an integer kernel, and what onnxruntime made of it."""

    node: str
    op: str  # ONNX op type in the file
    kind: str  # the integer_ops name: conv, linear, add, concat, pooling
    kernel: str | None  # op type after onnxruntime's optimiser (None: not found)
    reason: str = ""  # why it is not an integer kernel ("" when it is)

    @property
    def integer(self) -> bool:
        return not self.reason

    def line(self) -> str:
        where = f"{self.op} `{self.node}`"
        ran = f"runs as {self.kernel}" if self.kernel else "is not an integer kernel"
        return f"{where} {ran} in onnxruntime" + (f": {self.reason}" if self.reason else "")

    def as_dict(self) -> dict:
        return {**asdict(self), "integer": self.integer}


# -- what is promised -------------------------------------------------------------
def _compute_kind(op_type: str) -> str | None:
    return next((op.integer for op in ops.COMPUTE_OPS if op_type in op.onnx_ops), None)


def _data_inputs(node: onnx.NodeProto, g: Graph) -> list[str]:
    if node.op_type == "Add":
        return [i for i in node.input if i and g.origin_const(i) is None]
    if node.op_type == "Concat":
        return [i for i in node.input if i]
    return [node.input[0]]


def _quantized_8(g: Graph, name: str) -> bool:
    notes: list[str] = []
    bits, elem, _ = tensor_width(g, name, notes)
    return elem is not None and bits == 8


def _output_q8(g: Graph, name: str, depth: int = 0) -> bool:
    """Whether ``name`` reaches an 8-bit QuantizeLinear through Relu/Clip, guards and layout ops."""
    for user in g.consumers.get(name, []):
        if user.op_type == "QuantizeLinear" and TYPE_BITS.get(_q_type(g, user), (0,))[0] == 8:
            return True
        follow = user.op_type in (*PASSTHROUGH, "Relu", "Clip") or (user.op_type in ("Max", "Min")
                                                                       and g.is_const_bounded(user))
        if follow and depth < 8 and _output_q8(g, user.output[0], depth + 1):
            return True
    return False


def _network_output(g: Graph, name: str) -> bool:
    """Whether ``name`` is a graph output, directly or through layout ops and a Relu/Clip (no Q on the way)."""
    outputs = {o.name for o in g.model.graph.output}
    while True:
        if name in outputs:
            return True
        users = g.consumers.get(name, [])
        if len(users) != 1 or users[0].op_type not in (*PASSTHROUGH, "Relu", "Clip"):
            return False
        name = users[0].output[0]


def promised(g: Graph, batch: int, integer_ops: frozenset[str]) -> list[tuple[onnx.NodeProto, str]]:
    """(node, integer_ops kind) of every node the profile promises to run as an integer kernel."""
    out = []
    for node in g.model.graph.node:
        kind = _compute_kind(node.op_type)
        if kind is not None:
            if kind not in integer_ops:
                continue
            found = ops.read(g, node, batch)
            if found is None or found[1].act_type is not None:
                continue  # not a weight layer, or already an integer kernel
            read = found[1]
            if node.op_type == "Conv" and _network_output(g, node.output[0]):
                continue  # cgmq keeps network outputs float, and QLinearConv needs a quantized output
            if tensor_width(g, read.act, [])[0] == 8 and tensor_width(g, read.weight, [])[0] == 8:
                out.append((node, kind))
            continue
        kind = TENSOR_KINDS.get(node.op_type)
        if kind is None or kind not in integer_ops:
            continue
        inputs = _data_inputs(node, g)
        if (node.op_type != "Add" or len(inputs) == 2) and inputs \
                and all(_quantized_8(g, i) for i in inputs) and _output_q8(g, node.output[0]):
            out.append((node, kind))
    return out


# -- why not ----------------------------------------------------------------------
def _q_type(g: Graph, q: onnx.NodeProto) -> int:
    """Output type of a QuantizeLinear: its zero point's type (uint8 when it has none)."""
    if len(q.input) > 2 and q.input[2] and q.input[2] in g.types:
        return g.types[q.input[2]]
    return g.types.get(q.output[0], onnx.TensorProto.UINT8)


def _type_name(elem: int | None) -> str:
    return onnx.TensorProto.DataType.Name(elem).lower() if elem else "unknown"


def _describe(g: Graph, name: str) -> str:
    producer = g.producer.get(name)
    if producer is not None:
        return f"{producer.op_type} `{producer.name or producer.output[0]}`"
    if name in g.consts:
        return "a float initializer"
    return "a graph input"


def _readers(nodes: list[onnx.NodeProto]) -> str:
    return ", ".join(f"{n.op_type} `{n.name or n.output[0]}`" for n in nodes[:3]) + (" ..." if len(nodes) > 3 else "")


def _scalar(g: Graph, name: str | None) -> np.ndarray | None:
    value = g.const(name) if name else None
    return value.reshape(()) if value is not None and value.size == 1 else None


def _output_rule(g: Graph, node: onnx.NodeProto, float_ok: bool, outputs: set[str]) -> tuple[str, onnx.NodeProto | None]:
    """(reason or "", the QuantizeLinear) for the output side of a QDQ node group."""
    out = node.output[0]
    users = g.consumers.get(out, [])
    if out in outputs:
        if float_ok and not users:
            return "", None  # QGemm / MatMulIntegerToFloat may produce a float graph output
        return "its output is a graph output, which a fused kernel cannot keep", None
    clip = None
    if len(users) == 1 and users[0].op_type in ("Relu", "Clip"):
        clip = users[0]
        readers = g.consumers.get(clip.output[0], [])
        if clip.output[0] in outputs or len(readers) != 1:
            where = "is a graph output" if clip.output[0] in outputs else f"is read by {_readers(readers)}"
            return (f"the {clip.op_type} `{clip.name}` after it {where}: onnxruntime drops it only when one "
                    "QuantizeLinear is its only reader"), None
        users = readers
    qs = [u for u in users if u.op_type == "QuantizeLinear"]
    if not qs:
        if float_ok and clip is None:
            return "", None
        if not users:
            return "its output is not read", None
        after = f" after {clip.op_type} `{clip.name}`" if clip is not None else ""
        return f"its output{after} is read by {_readers(users)}, not by a QuantizeLinear", None
    if len(users) != 1:
        others = [u for u in users if u.op_type != "QuantizeLinear"] or users[1:]
        return (f"its output is read by {_readers(others)} as well as by QuantizeLinear `{qs[0].name}`: the "
                "QuantizeLinear must be its only reader"), None
    q = qs[0]
    if clip is not None:
        elem = _q_type(g, q)
        zero = _scalar(g, q.input[2] if len(q.input) > 2 else None)
        z = int(zero) if zero is not None else 0
        if clip.op_type == "Relu" and elem in TYPE_BITS:
            bits, signed = TYPE_BITS[elem]
            low = -(1 << (bits - 1)) if signed else 0
            if z != low:
                return (f"the Relu before its QuantizeLinear stays: the zero point is {z}, onnxruntime drops a "
                        f"Relu only when it is the type's minimum {low}"), q
        if clip.op_type == "Clip" and any(i and i not in g.consts for i in clip.input[1:]):
            return "the Clip before its QuantizeLinear has non-constant bounds", q
    return "", q


def _type_rules(kind: str, node: onnx.NodeProto, dt_in: list[int | None], dt_out: int | None,
                dt_w: int | None) -> str:
    small = {t for t, (b, _) in TYPE_BITS.items() if b in (2, 4, 16)}
    names = "/".join(_type_name(t) for t in dt_in)
    if any(t in small for t in dt_in) or dt_out in small or dt_w in small:
        return f"operand types {names} / {_type_name(dt_out)} / weight {_type_name(dt_w)}: no 2-, 4- or 16-bit kernels"
    if kind in ("add", "concat", "pooling"):
        if len(set(dt_in)) > 1 or (dt_out is not None and dt_out != dt_in[0]):
            return f"its inputs are {names} and its output {_type_name(dt_out)}: onnxruntime needs one type for all"
        return ""
    if dt_out is not None and dt_out != dt_in[0]:
        return (f"its input is {_type_name(dt_in[0])} but its output {_type_name(dt_out)}: onnxruntime needs the "
                "same type")
    if dt_in[0] == onnx.TensorProto.INT8 and dt_w != onnx.TensorProto.INT8:
        return f"an int8 input needs an int8 weight, the weight is {_type_name(dt_w)}"
    if dt_w not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
        return f"the weight is {_type_name(dt_w)}, not int8"
    return ""


def blocked_by(g: Graph, node: onnx.NodeProto, kind: str) -> str:
    """The onnxruntime QDQ selector rule that keeps ``node`` from becoming an integer kernel ("" if none)."""
    outputs = {o.name for o in g.model.graph.output}
    if kind in ("conv", "linear"):
        data = [node.input[0], node.input[1]]
    else:
        data = _data_inputs(node, g)
    dqs = []
    for i, name in enumerate(data):
        producer = g.producer.get(name)
        if producer is None or producer.op_type != "DequantizeLinear":
            return f"input {i} (`{name}`) comes from {_describe(g, name)}, not straight from a DequantizeLinear"
        if name in outputs:
            return f"input {i} (`{name}`) is also a graph output"
        dqs.append(producer)
    float_ok = node.op_type in ("Gemm", "MatMul")
    reason, q = _output_rule(g, node, float_ok, outputs)
    if reason:
        return reason
    dt = [g.types.get(dq.input[0]) for dq in dqs]
    dt_out = _q_type(g, q) if q is not None else None
    if kind in ("conv", "linear"):
        reason = _type_rules(kind, node, dt[:1], dt_out, dt[1])
        if reason:
            return reason
        return _bias_rule(g, node, dqs[0], q)
    if node.op_type == "MaxPool" and q is not None:
        same = all(np.array_equal(g.const(a), g.const(b)) if g.const(a) is not None and g.const(b) is not None
                   else a == b for a, b in zip(dqs[0].input[1:], q.input[1:]))
        scale = _scalar(g, q.input[1])
        if not same:
            return "its DequantizeLinear and QuantizeLinear have different scales or zero points"
        if scale is None or float(scale) <= 0:
            return "its scale is not one positive constant"
    return _type_rules(kind, node, dt, dt_out, None)


def _bias_rule(g: Graph, node: onnx.NodeProto, dq_x: onnx.NodeProto, q: onnx.NodeProto | None) -> str:
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is None or node.op_type == "MatMul":
        return ""
    producer = g.producer.get(bias)
    if producer is not None and producer.op_type == "DequantizeLinear":
        elem = g.types.get(producer.input[0])
        return "" if elem == onnx.TensorProto.INT32 else f"its bias is {_type_name(elem)}, not int32"
    scalar_scale = _scalar(g, dq_x.input[1]) is not None
    if bias in g.consts and scalar_scale and q is not None:
        return ""  # onnxruntime quantizes a float bias to int32 itself
    if q is None:
        return "its float bias stays float when the output is not quantized: store it as int32 codes behind a DQ"
    return "its float bias cannot be quantized by onnxruntime (the input has no single scale)"


# -- the check --------------------------------------------------------------------
def _base(name: str) -> str:
    return _TOKEN.sub("", name)


def _kernel_of(node: onnx.NodeProto, kind: str, by_name: dict[str, list[onnx.NodeProto]],
               dq_outputs: set[str]) -> tuple[str | None, bool]:
    """(op type onnxruntime runs for ``node``, whether that is an integer kernel), from the optimized graph."""
    candidates = [n for n in by_name.get(node.name, []) if n.op_type not in ("Transpose", "QuantizeLinear",
                                                                              "DequantizeLinear")]
    if not candidates:
        return None, False
    wanted = INTEGER_COMPUTE_KERNELS if kind in ("conv", "linear") else INTEGER_TENSOR_KERNELS
    for n in candidates:
        if n.op_type in wanted:
            return n.op_type, True
        if node.op_type == "MaxPool" and n.op_type in MAXPOOL:
            return n.op_type, not (n.input and n.input[0] in dq_outputs)
    return candidates[0].op_type, False


def check(path: str | os.PathLike, integer_ops: frozenset[str] | tuple[str, ...]) -> tuple[Finding, ...]:
    """Every node ``integer_ops`` promises in the file at ``path``, with what onnxruntime runs and why."""
    raw = onnx.load(str(path))
    model, batch = prepare(raw)
    g = Graph(model)
    wanted = promised(g, batch, frozenset(integer_ops))
    if not wanted:
        return ()
    with tempfile.TemporaryDirectory(prefix="cgmq-kernels-") as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        load_session(path, optimized)
        opt = onnx.load(optimized, load_external_data=False)
    by_name: dict[str, list[onnx.NodeProto]] = {}
    for n in opt.graph.node:
        by_name.setdefault(_base(n.name), []).append(n)
    dq_outputs = {n.output[0] for n in opt.graph.node if n.op_type == "DequantizeLinear"}
    findings = []
    for node, kind in wanted:
        kernel, integer = _kernel_of(node, kind, by_name, dq_outputs)
        reason = ""
        if not integer:
            reason = blocked_by(g, node, kind) or ("it matches onnxruntime's QDQ rules as cgmq reads them, yet "
                                                   "onnxruntime did not fuse it")
        findings.append(Finding(node=node.name, op=node.op_type, kind=kind, kernel=kernel, reason=reason))
    return tuple(findings)


def require(findings: tuple[Finding, ...], profile: str = "the profile") -> None:
    """Raise :class:`CheckFailedError` (exit 4) naming the first nodes that are not integer kernels."""
    failed = [f for f in findings if not f.integer]
    if not failed:
        return
    import onnxruntime

    head = "; ".join(f.line() for f in failed[:2])
    more = f" (and {len(failed) - 2} more)" if len(failed) > 2 else ""
    raise CheckFailedError(f"{len(failed)} of {len(findings)} ops that {profile} runs as integer kernels would run "
                           f"in float in onnxruntime {onnxruntime.__version__}: {head}{more}",
                           "pass --allow-float-fallback to write the file anyway (with a warning per op)")


def check_file(path: str | os.PathLike, integer_ops, label: str | None = None) -> tuple[Finding, ...]:
    """:func:`check`, with a file onnxruntime cannot load as one :class:`CgmqError` line."""
    try:
        return check(path, integer_ops)
    except CgmqError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnx / onnxruntime raise many types
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CgmqError(f"cannot check the integer kernels of {label or Path(path).name}: {first}",
                        "please report this model") from None
