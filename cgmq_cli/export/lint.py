"""onnxruntime side of verification: loading, and the deployment lint.

The lint answers "will onnxruntime's CPU provider run this layer as an integer
kernel, or dequantize the operands and run the float op?" by asking
onnxruntime itself: it loads the file with default session options (as users
do), has it write its optimized graph, and looks at what consumes each layer's
weight initializer there. Measured with onnxruntime 1.32 on x86, only int8
weights with 8-bit (uint8) activations fuse, and only in these patterns:

* ``DQ -> Conv -> [Relu] -> Q``: the output is re-quantized (the next layer's
  8-bit input, with no other consumer) -> ``QLinearConv``;
* ``DQ -> MatMul`` without bias and float output -> ``MatMulIntegerToFloat``;
  with an output Q -> ``QLinearMatMul``; MatMul + bias Add + Q -> ``QGemm``.

Everything else (2/4/16-bit, a Conv whose output is float or also feeds a
residual Add, a biased linear layer with a float output) runs as
DequantizeLinear + float op. The static rule (:func:`static_int_candidate`)
is the necessary condition (native int8 weight x 8-bit input); the runtime
decides the rest, so the lint reports what it did on this machine.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from cgmq_cli.errors import CgmqError, ExportError

INT_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "ConvInteger", "MatMulInteger",
    "DynamicQuantizeMatMul", "NhwcQLinearConv", "QAttention",
})
WEIGHT_ONLY_KERNELS = frozenset({"MatMulNBits", "MatMulBnb4", "GatherBlockQuantized"})


def _ort():
    import onnxruntime as ort

    return ort


def load_session(path: str | os.PathLike, optimized_path: str | None = None, *, optimize: bool = True):
    """An onnxruntime CPU session with default session options (the way users load a file).

    ``optimize=False`` turns graph optimizations off: every QuantizeLinear and
    DequantizeLinear then runs as written (the file's exact meaning), instead of
    being fused into integer kernels. Raises :class:`ExportError` with
    onnxruntime's first message line when it fails to load.
    """
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"onnxruntime {ort.__version__} cannot load {Path(path).name}: {first}",
                          "check the file's opset and types against the onnxruntime version") from None


def static_int_candidate(weight_type: int | None, act_type: int | None, bits_w: int, bits_a: int) -> bool:
    """The necessary condition for an integer kernel: native int8 weight, native 8-bit activation."""
    return bits_w == 8 and bits_a == 8 and weight_type == onnx.TensorProto.INT8 \
        and act_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)


def classify(op_type: str) -> str:
    if op_type in INT_KERNELS:
        return "integer"
    if op_type in WEIGHT_ONLY_KERNELS:
        return "weight-only"
    return "float"


def ort_kernels(path: str | os.PathLike, weights: dict[str, str | None]) -> tuple[dict[str, str | None], str | None]:
    """What onnxruntime runs for each compute node, found through its weight initializer.

    ``weights`` maps a node name to the name of the initializer its weight
    comes from (the integer codes behind a DequantizeLinear, or a float
    initializer). Returns (node name -> kernel op type, or None where not
    found; None, or the load error message).
    """
    with tempfile.TemporaryDirectory(prefix="cgmq-lint-") as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        try:
            load_session(path, optimized)
        except CgmqError as exc:
            return {name: None for name in weights}, exc.message
        if not os.path.exists(optimized):
            return {name: None for name in weights}, None
        opt = onnx.load(optimized, load_external_data=False)
    by_name: dict[str, str] = {}
    for node in opt.graph.node:  # fused nodes keep the target's name (+ "_token_N" or "/FusionName/")
        if node.op_type not in ("DequantizeLinear", "QuantizeLinear", "Transpose", "Max", "Min"):
            by_name.setdefault(node.name.split("_token_")[0].split("/")[0], node.op_type)
    origin: dict[str, str] = {}  # tensor -> the weight initializer it carries, through DQ and range guards
    for node in opt.graph.node:
        if node.op_type in ("DequantizeLinear", "Max", "Min") and node.input:
            source = node.input[0] if node.op_type == "DequantizeLinear" else next(
                (i for i in node.input if i in origin or i in weights.values()), None)
            if source is not None:
                origin[node.output[0]] = origin.get(source, source)
    consumer: dict[str, str] = {}
    for node in opt.graph.node:
        if node.op_type in ("DequantizeLinear", "QuantizeLinear", "Max", "Min"):
            continue
        for name in node.input:
            consumer.setdefault(origin.get(name, name), node.op_type)
    found: dict[str, str | None] = {}
    for node_name, init in weights.items():
        if node_name in by_name:
            found[node_name] = by_name[node_name]
        elif init is None:
            found[node_name] = None
        elif init in consumer:
            found[node_name] = consumer[init]
        else:  # repacked (e.g. MatMulNBits) or folded away
            found[node_name] = next((n.op_type for n in opt.graph.node if n.op_type in WEIGHT_ONLY_KERNELS
                                     and any(i.startswith(init) for i in n.input)), None)
    return found, None
