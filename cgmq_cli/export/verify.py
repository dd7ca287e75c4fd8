"""Read the widths of any QDQ ONNX file back; budget check, parity, latency.

Per Conv / Gemm / MatMul node (``cgmq verify``)::

    MACs  = output elements per example x K        K = Cin/group x kernel (Conv),
                                                   the reduced dimension (MatMul, Gemm)
    BOPs  = MACs x b_w x b_a
    bytes = weight elements x b_w / 8  +  bias elements x bias bits / 8

Shapes come from ONNX shape inference with the batch dimension (first dim of
the graph input, symbolic or 1) set to 1; a fixed batch B > 1 is divided out.
``b_a`` is the width of the first input, ``b_w`` of the second (the weight).

Width of a tensor (the rule, for files that are not cgmq's as well):

1. Walk back through layout-only ops (Identity, Reshape, Flatten, Transpose,
   Squeeze, Unsqueeze) and range guards (Clip / Max / Min against constant
   scalars). No DequantizeLinear there -> a float tensor: its storage width
   (32 for float32, 16 for float16).
2. Otherwise start from the width of the DequantizeLinear input's type
   (int2/uint2 -> 2, int4 -> 4, int8 -> 8, int16 -> 16, ...) and its grid.
3. Narrow the grid by range evidence, when present (none -> the type width):
   a. an integer ``Clip`` with constant bounds between QuantizeLinear (or the
      initializer) and the DequantizeLinear -> its [min, max];
   b. float bounds right before the QuantizeLinear (a chain of ``Clip``,
      ``Max``, ``Min`` with constant scalar bounds), with a constant scalar
      scale -> [round(min/s), round(max/s)] + zero point;
   c. on a constant input, the node metadata ``cgmq.range = "lo,hi"`` of the
      DequantizeLinear, trusted only when every stored code lies in [lo, hi]
      (a tampered code makes it count at the type width again).
   The width is then the narrowest grid of the type's signedness holding the
   range: a 2-bit tensor in an int4 or int8 container counts as 2 bits.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import torch

from cgmq_cli.errors import CgmqError, CheckFailedError
from cgmq_cli.outputs import logits
from cgmq_cli.export import lint
from cgmq_cli.export.lint import load_session
from cgmq_cli import ops
from cgmq_cli.export.qdq_read import Graph, integer_width, prepare, tensor_bytes, tensor_width
from cgmq_cli.export.qdq_types import FLOAT_BYTES

__all__ = ["LayerWidths", "VerifyResult", "ParityResult", "read_widths", "check_budget", "parity", "latency",
           "load_session"]


@dataclass(frozen=True)
class LayerWidths:
    node: str
    op: str
    macs: int
    bits_w: int
    bits_a: int
    bops: int
    weight_bytes: float
    int_candidate: bool  # native int8 weight x 8-bit activation (necessary for an integer kernel)
    kernel: str | None = None  # what onnxruntime runs (e.g. "QLinearConv", "Conv"); None: not checked
    lint: str = ""  # "integer kernel (QLinearConv)", "dequantize + float Conv", ...
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifyResult:
    layers: tuple[LayerWidths, ...]
    macs: int
    bops: int
    weight_bytes: float
    opset: int | None
    metadata: dict[str, str] = field(default_factory=dict)
    loads: bool | None = None  # onnxruntime CPU, default session options; None: not tried
    load_error: str | None = None
    other_bytes: float = 0.0  # float constants besides the layers' weights and biases (LayerNorm, embeddings, ...)

    @property
    def quantized_macs(self) -> int:
        return sum(layer.macs for layer in self.layers if min(layer.bits_w, layer.bits_a) < 32)

    @property
    def coverage(self) -> float:
        return 100.0 * self.quantized_macs / self.macs if self.macs else 100.0

    def as_dict(self) -> dict:
        return {"macs": self.macs, "bops": self.bops, "weight_bytes": self.weight_bytes, "opset": self.opset,
                "other_bytes": self.other_bytes, "quantized_macs": self.quantized_macs, "coverage": self.coverage,
                "loads": self.loads, "load_error": self.load_error, "metadata": self.metadata,
                "layers": [{**asdict(layer), "notes": list(layer.notes)} for layer in self.layers]}


def read_widths(source: str | os.PathLike | onnx.ModelProto, *, runtime: bool = True) -> VerifyResult:
    """Widths, MACs, BOPs and weight bytes of every Conv/Gemm/MatMul of a QDQ file.

    With ``runtime``, also load the file in onnxruntime (CPU, default session
    options: ``loads`` / ``load_error``) and report per layer the kernel it
    runs (``kernel``, ``lint``); without, ``lint`` is the static rule. The
    kernels are those of this machine's onnxruntime (integer kernels need
    x86/ARM int8 support); a weight shared by several nodes reports the
    kernel of its first consumer.
    """
    if isinstance(source, onnx.ModelProto):
        raw, path = source, None
    else:
        path = Path(source)
        try:
            raw = onnx.load(str(path))
        except Exception as exc:
            raise CgmqError(f"cannot read {path}: {str(exc).strip().splitlines()[0][:200]}",
                            "pass an ONNX model file") from None
    _check_measurable(raw, path)
    model, batch = prepare(raw)
    g = Graph(model)
    rows, weights, seen = [], {}, set()
    for i, node in enumerate(model.graph.node):
        found = ops.read(g, node, batch)
        if found is None:
            continue
        _, read = found
        name = node.name or f"{node.op_type}_{i}"
        notes: list[str] = [read.note] if read.note else []
        a_in, w_in, macs, bias = read.act, read.weight, read.macs, read.bias
        bits_a, a_type, _ = (integer_width(read.act_type) or tensor_width(g, a_in, notes)) if a_in is not None \
            else (32, None, False)  # a lookup
        bits_w, w_type, w_narrowed = integer_width(read.weight_type) or tensor_width(g, w_in, notes)
        bias_bits = tensor_width(g, bias, [])[0] if bias else 0
        wbytes = tensor_bytes(g, w_in, bits_w, seen) + tensor_bytes(g, bias, bias_bits, seen)
        weights[name] = g.origin_const(w_in)
        rows.append(dict(node=name, op=node.op_type, macs=macs, bits_w=bits_w, bits_a=bits_a,
                         bops=macs * bits_w * bits_a, weight_bytes=wbytes, notes=tuple(notes),
                         int_candidate=lint.static_int_candidate(None if w_narrowed else w_type, a_type,
                                                                 bits_w, bits_a)))
    if not rows:
        raise CgmqError(f"{_label(path)} has no Conv, Gemm, MatMul or integer kernel (QLinearConv, QGemm, "
                        "MatMulInteger, ...): cgmq cannot measure its MACs or BOPs",
                        "verify reads files whose compute is in these ops; refusing rather than reporting 0 BOPs")
    loads, error, kernels = None, None, {}
    if runtime:
        kernels, error = _runtime_kernels(raw, path, weights)
        loads = error is None
    for row in rows:
        row["kernel"] = kernels.get(row["node"])
        row["lint"] = _lint_text(row, error)
    layers = tuple(LayerWidths(**row) for row in rows)
    opset = next((o.version for o in raw.opset_import if o.domain in ("", "ai.onnx")), None)
    return VerifyResult(layers=layers, macs=sum(r.macs for r in layers), bops=sum(r.bops for r in layers),
                        weight_bytes=sum(r.weight_bytes for r in layers), opset=opset,
                        metadata={p.key: p.value for p in raw.metadata_props}, loads=loads, load_error=error,
                        other_bytes=_other_bytes(g, seen))


def _other_bytes(g: Graph, counted: set[str]) -> float:
    """Bytes of float constants (more than one element) that are neither a layer's weight or bias nor
    a Q/DQ scale: parameters the model keeps in float, as stored in the file."""
    qdq = {name for node in g.model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
           for name in node.input[1:]}
    total = 0.0
    for name, t in g.consts.items():
        if name in counted or name in qdq or t.data_type not in FLOAT_BYTES:
            continue
        n = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
        if n > 1:
            total += n * FLOAT_BYTES[t.data_type]
    return total


# Ops with multiply-accumulates that cgmq cannot count: a file that has them would read back too few BOPs.
UNMEASURED_OPS = frozenset({
    "ConvTranspose", "QLinearConvTranspose", "Einsum", "LSTM", "GRU", "RNN", "DynamicQuantizeLSTM", "Attention",
    "QAttention", "MultiHeadAttention", "GroupQueryAttention", "MatMulNBits", "MatMulBnb4", "FusedConv",
    "FusedGemm", "FusedMatMul", "NhwcQLinearConv", "QOrderedMatMul", "GatherBlockQuantized", "QLinearMatMulNBits",
})


def _label(path: Path | None) -> str:
    return path.name if path is not None else "the model"


def _check_measurable(raw: onnx.ModelProto, path: Path | None) -> None:
    """Refuse (exit 2) a file that is not a model, or whose compute cgmq cannot count."""
    if not raw.HasField("graph") or not raw.graph.node:
        what = "is empty" if raw.ByteSize() == 0 else "has no graph nodes"
        raise CgmqError(f"{_label(path)} {what}: not an ONNX model cgmq can measure", "pass an exported ONNX model file")
    unknown: dict[str, int] = {}
    for node in raw.graph.node:
        if node.op_type in UNMEASURED_OPS:
            unknown[node.op_type] = unknown.get(node.op_type, 0) + 1
    if unknown:
        listed = ", ".join(f"{op} ({n})" for op, n in sorted(unknown.items()))
        raise CgmqError(f"{_label(path)} has ops whose MACs cgmq cannot count: {listed}; its BOPs would be too low",
                        "verify reads Conv, Gemm, MatMul and onnxruntime's integer kernels (QLinearConv, QGemm, "
                        "QLinearMatMul, ConvInteger, MatMulInteger, DynamicQuantizeMatMul)")


def _runtime_kernels(raw: onnx.ModelProto, path: Path | None, weights: dict) -> tuple[dict, str | None]:
    if path is not None:
        return lint.ort_kernels(path, weights)
    with tempfile.TemporaryDirectory(prefix="cgmq-verify-") as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        tmp_path.write_bytes(raw.SerializeToString())
        return lint.ort_kernels(tmp_path, weights)


def _lint_text(row: dict, error: str | None) -> str:
    """The deployment lint of one layer: what onnxruntime's CPU provider runs."""
    kernel, op = row.get("kernel"), row["op"]
    is_float = row["bits_w"] >= 32 and row["bits_a"] >= 32
    if error is not None:
        return "onnxruntime cannot load the file"
    if kernel is None:  # not checked with onnxruntime: the static rule
        if row["int_candidate"]:
            return "integer kernel possible (int8 weight x 8-bit input)"
        return f"float {op}" if is_float else f"dequantize + float {op}"
    kind = lint.classify(kernel)
    if kind == "integer":
        return f"integer kernel ({kernel})"
    if kind == "weight-only":
        return f"integer weights, float math ({kernel})"
    return f"float {kernel}" if is_float else f"dequantize + float {kernel}"


def check_budget(result: VerifyResult, bops: float | None = None, weight_bytes: float | None = None) -> None:
    """Raise :class:`CheckFailedError` when the file is over a budget."""
    over = []
    stored = result.weight_bytes + result.other_bytes  # the layers and every float parameter the file keeps
    for label, value, limit in (("BOPs", result.bops, bops), ("weight bytes", stored, weight_bytes)):
        if limit is not None and value > limit:
            over.append(f"{label} {value:,.0f} > {limit:,.0f} (+{100.0 * (value / limit - 1):.2f}%)"
                        if limit > 0 else f"{label} {value:,.0f} > {limit:,.0f}")
    if over:
        raise CheckFailedError("over budget: " + "; ".join(over),
                               "the widths in the file exceed the budget; compress again or raise the budget")


@dataclass(frozen=True)
class ParityResult:
    agreement: float  # percent of top-1 predictions that match
    max_abs_diff: float
    mean_abs_diff: float
    n: int
    # when the default (fused) session fell short: the same with graph optimizations off, the file's exact meaning
    file_agreement: float | None = None
    file_max_abs_diff: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _first(out) -> torch.Tensor:
    return logits(out)


def _top1_agreement(ref: torch.Tensor, got: torch.Tensor) -> tuple[int, int]:
    """Rows where onnxruntime's top-1 class is a PyTorch top-1 class.

    Quantized logits tie exactly more often than float ones; a class whose
    PyTorch logit equals the maximum (within 1e-6 of the row's scale) is a
    top-1 class as much as the one ``argmax`` happens to return.
    """
    classes = ref.shape[-1] if ref.ndim > 1 else ref.numel()
    ref, got = ref.reshape(-1, classes), got.reshape(-1, classes)
    best = ref.max(-1).values
    picked = ref.gather(1, got.argmax(-1, keepdim=True)).squeeze(1)
    tol = 1e-6 * ref.abs().max(-1).values.clamp(min=1.0)
    return int((picked >= best - tol).sum()), ref.shape[0]


def parity(qm, onnx_path: str | os.PathLike, inputs: Iterable[torch.Tensor], optimize: bool = True) -> ParityResult:
    """Top-1 agreement and logit differences between onnxruntime and the PyTorch quantized model
    (``optimize=False``: onnxruntime without graph optimizations, see :func:`load_session`)."""
    session = load_session(onnx_path, optimize=optimize)
    meta = session.get_inputs()[0]
    fixed = meta.shape[0] if meta.shape and isinstance(meta.shape[0], int) else None
    agree = total = 0
    max_diff, sum_diff, count = 0.0, 0.0, 0
    was_training = qm.gm.training
    device = next(qm.gm.parameters(), torch.empty(0)).device
    qm.gm.eval()
    try:
        for batch in inputs:
            batch = batch[0] if isinstance(batch, (tuple, list)) else batch
            batch = batch.detach().cpu()
            batch = batch.float() if batch.is_floating_point() else batch.long()
            chunks = batch.split(fixed) if fixed else (batch,)
            for x in chunks:
                with torch.no_grad():
                    ref = _first(qm.gm(x.to(device))).float().cpu()
                got = torch.from_numpy(session.run(None, {meta.name: x.numpy()})[0]).float().reshape(ref.shape)
                diff = (ref - got).abs()
                max_diff = max(max_diff, float(diff.max()) if diff.numel() else 0.0)
                sum_diff += float(diff.sum())
                count += diff.numel()
                agree_rows, rows = _top1_agreement(ref, got)
                agree += agree_rows
                total += rows
    finally:
        qm.gm.train(was_training)
    if total == 0:
        raise CgmqError("parity needs at least one input", "pass validation data or a number of random inputs")
    return ParityResult(agreement=100.0 * agree / total, max_abs_diff=max_diff,
                        mean_abs_diff=sum_diff / max(count, 1), n=total)


def latency(path: str | os.PathLike, example: torch.Tensor | np.ndarray, repeats: int = 50, warmup: int = 5) -> float:
    """Median wall time in milliseconds of one onnxruntime run (default session options)."""
    session = load_session(path)
    name = session.get_inputs()[0].name
    if isinstance(example, torch.Tensor):
        example = example.detach().cpu()
        x = (example.float() if example.is_floating_point() else example.long()).numpy()
    else:
        x = np.asarray(example)
    for _ in range(warmup):
        session.run(None, {name: x})
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append((time.perf_counter() - start) * 1e3)
    return float(statistics.median(times))
