"""Export a prepared model to ONNX with standard QuantizeLinear/DequantizeLinear.

Why this path
-------------
torch.onnx cannot emit sub-8-bit Q/DQ from fake-quant arithmetic (it exports
the Div/Round/Clip/Mul, or at best 8-bit ``fake_quantize`` ops). A custom op
with an onnxscript translation could emit Q/DQ, but inside torch.onnx's graph:
its optimizer may still fold or move around them (e.g. a weight DQ followed by
the Transpose of a linear layer), and choosing the layout of each weight needs
to see its consumer, which is a graph rewrite anyway. So cgmq keeps torch.onnx
for the bulk of the graph, which therefore works for any traceable model
(residual adds, concat, pooling, flatten, ...), and inserts Q/DQ afterwards
with the onnx helpers, where it controls every node:

1. each quantizer call of ``qm.gm`` is replaced by a *marker*
   ``torch.onnx.ops.symbolic("cgmq::Mark", idx)``: an identity-shaped custom
   node that torch.onnx passes through verbatim and its optimizer cannot fold
   away or move, so it pins the exact tensor (a layer's input activation, or
   its weight at one call site) in the exported graph;
2. :mod:`cgmq_cli.export.qdq_rewrite` replaces every marker by standard ops:
   integer weight initializers (codes computed in PyTorch, bit-identical to the
   fake quantizer) -> DequantizeLinear, and activation Q -> DQ, with the
   containers and onnxruntime guards of :mod:`cgmq_cli.export.qdq_types`. No
   custom op is left in the file.

torch.onnx translates to opset 18 and newer; for ``opset`` 13-17 the finished
graph is exported at 18 and converted down by :mod:`cgmq_cli.export.opsets`.

The float model (:func:`export_float`) goes through the very same path with
every width at 32, so both files have the same structure and layer names.
Files are written atomically (a temporary file in the target directory,
checked, then ``os.replace``); a failed export or failed check leaves nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import onnx
import torch
from torch import fx

from cgmq_cli import __version__
from cgmq_cli.errors import ExportError, ParityError
from cgmq_cli.export import diagnose, opsets, qdq_types, verify
from cgmq_cli.export.qdq_rewrite import MARK_DOMAIN, MARK_OP, Mark, Rewritten, rewrite
from cgmq_cli.graph import passes
from cgmq_cli.ops.base import attr_tensor
from cgmq_cli.quant.functional import FLOAT_BITS
from cgmq_cli.atomic import temp_file

MIN_AGREEMENT = 99.9  # percent top-1 agreement with PyTorch an export must reach
PARITY_EXAMPLES = 64  # random inputs when no validation data is given
MAX_PROTO_BYTES = 2**31 - 1
TORCH_MIN_OPSET = 18  # the lowest opset torch.onnx (dynamo) translates to


@dataclass(frozen=True)
class ExportedLayer:
    name: str
    node: str  # the Conv/MatMul node of the (first) call site
    op: str
    bits_w: int
    bits_a: int
    weight_type: str  # "int4", "int8" (container), ... or "float"
    act_type: str


@dataclass(frozen=True)
class ExportInfo:
    path: Path
    opset: int
    size_bytes: int
    layers: tuple[ExportedLayer, ...]
    dynamic_batch: bool
    metadata: dict[str, str] = field(default_factory=dict)
    parity: verify.ParityResult | None = None  # when parity was checked
    kernels: tuple[diagnose.Finding, ...] = ()  # the ops the profile runs as integer kernels, checked in onnxruntime

    def as_dict(self) -> dict:
        return {"path": str(self.path), "opset": self.opset, "size_bytes": self.size_bytes,
                "dynamic_batch": self.dynamic_batch,
                "layers": [vars(layer) for layer in self.layers],
                "parity": self.parity.as_dict() if self.parity is not None else None,
                "integer_kernels": [f.as_dict() for f in self.kernels]}


def _mark(x: torch.Tensor, idx: int) -> torch.Tensor:
    return torch.onnx.ops.symbolic(f"{MARK_DOMAIN}::{MARK_OP}", (x,), {"idx": idx},
                                   dtype=x.dtype, shape=x.shape, version=1)


def _marked_module(qm, float_only: bool) -> tuple[fx.GraphModule, list[Mark]]:
    """A copy of ``qm.gm`` whose quantizer calls are markers (or nothing when ``float_only``).

    Every activation quantizer becomes one marker on its tensor, and every
    alias (a grid-preserving op's output, e.g. after max-pooling) a marker with
    the same parameters; every weight quantizer call one marker per call site.
    """
    gm = qm.gm
    qs = qm.tensor_quantizers()
    rows = {layer.node: layer for layer in qm.layers}
    widths = qm.widths()
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    marks: list[Mark] = []
    prefix = passes.QUANT_ROOT + "."

    def mark(source: fx.Node, replaced: fx.Node | None, m: Mark) -> None:
        marks.append(m)
        with graph.inserting_after(source):
            new = graph.call_function(_mark, (source, len(marks) - 1))
        if replaced is not None:
            replaced.replace_all_uses_with(new)
            graph.erase_node(replaced)
        else:
            source.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)

    nodes = {n.name: n for n in graph.nodes}
    for node in list(graph.nodes):
        if node.op != "call_module" or not str(node.target).startswith(prefix):
            continue
        key = str(node.target)[len(prefix):]
        q = qs[key]
        bits = FLOAT_BITS if float_only else q.bits
        step = q.step(bits).detach() if bits < FLOAT_BITS else None
        zero = q.zero_point_value(bits) if bits < FLOAT_BITS else 0
        if q.kind == "act":
            mark(node.args[0], node, Mark(key=key, role="act", layer="", bits=bits, signed=q.is_signed, step=step,
                                          zero_point=zero, grid=q.grid(bits) if bits < FLOAT_BITS else None))
            continue
        user = next(iter(node.users))
        row = rows[user.name]
        b_node = user.args[2] if len(user.args) > 2 else user.kwargs.get("bias")
        bias = _attr_tensor(gm, b_node) if isinstance(b_node, fx.Node) and b_node.op == "get_attr" else None
        integer = (not float_only and row.integer in qm.integer_ops and bits == 8 and bool(row.act_keys)
                   and all(widths[k] == 8 for k in row.act_keys))
        mark(node.args[0], node, Mark(key=key, role="weight", layer=row.name, bits=bits, signed=True, step=step,
                                      grid=q.grid(bits) if bits < FLOAT_BITS else None,
                                      weight=_attr_tensor(gm, node.args[0]), bias=bias, integer=integer,
                                      tensor=str(node.args[0].target), axis=q.axis,
                                      act_step=float(qs[row.act_keys[0]].step(8).detach()) if integer else None))
    for row in qm.layers:  # activation products have no weight marker: a marker on the output names them
        if row.weight_key is None:
            integer = (not float_only and row.integer in qm.integer_ops and all(widths[k] == 8 for k in row.act_keys))
            mark(nodes[row.node], None, Mark(key="", role="compute", layer=row.name, bits=FLOAT_BITS, signed=True,
                                            step=None, integer=integer))
    if not float_only:
        for key, info in qm.tensors.items():
            q = qs[key]
            if info.kind != "act" or q.bits >= FLOAT_BITS:
                continue
            for alias in info.aliases:
                mark(nodes[alias], None, Mark(key=key, role="alias", layer="", bits=q.bits, signed=q.is_signed,
                                              step=q.step(q.bits).detach(), zero_point=q.zero_point_value(q.bits),
                                              grid=q.grid(q.bits)))
    graph.lint()
    return fx.GraphModule(gm, graph, "CgmqExport"), marks


def _attr_tensor(gm: torch.nn.Module, node: fx.Node) -> torch.Tensor:
    """The parameter or buffer a ``get_attr`` node reads."""
    return attr_tensor(gm, str(node.target))


def _example(shape: tuple[int, ...], dtype: torch.dtype, device, generator=None) -> torch.Tensor:
    """A random input: normal floats, or token ids 0/1 (valid for any embedding table)."""
    if dtype.is_floating_point:
        return torch.randn(*shape, generator=generator).to(device)
    return torch.randint(0, 2, shape, generator=generator).to(device=device, dtype=dtype)


def _torch_export(module: fx.GraphModule, sample_shape: tuple[int, ...], opset: int,
                  dtype: torch.dtype = torch.float32) -> tuple[onnx.ModelProto, bool]:
    """torch.onnx (dynamo) export; batch dimension dynamic when the model allows it.

    Below opset 18 (the lowest torch.onnx translates to) it exports at 18; the
    caller converts the finished QDQ graph down with onnx's version converter.
    """
    device = next(module.parameters(), torch.empty(0)).device
    attempts = [(_example((2, *sample_shape), dtype, device), ({0: torch.export.Dim("batch")},)),
                (_example((1, *sample_shape), dtype, device), None)]
    errors = []
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for example, dynamic in attempts:
        try:
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                program = torch.onnx.export(module, (example,), dynamo=True, opset_version=max(opset, TORCH_MIN_OPSET),
                                            dynamic_shapes=dynamic, optimize=True, verbose=False,
                                            external_data=False)
            model = program.model_proto
            break
        except Exception as exc:  # torch.export / torch.onnx raise many types
            errors.append(str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__)
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
    else:
        raise ExportError(f"torch.onnx could not export the model: {errors[-1]}",
                          "the model must be exportable with torch.onnx.export(..., dynamo=True)")
    return model, dynamic is not None


def _finalize(model: onnx.ModelProto, opset: int, metadata: dict[str, str]) -> None:
    model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(list(model.opset_import), True))
    model.producer_name = "cgmq"
    model.producer_version = __version__
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)


def _metadata(qm, opset: int, user: dict | None, float_only: bool) -> dict[str, str]:
    out = {"cgmq.version": __version__, "cgmq.opset": str(opset),
           "cgmq.kind": "float" if float_only else "qdq"}
    if not float_only:
        cost = qm.cost()
        out["cgmq.cost"] = json.dumps({"bops": cost.bops, "rel_bops": cost.rel_bops,
                                       "weight_bytes": cost.weight_bytes, "macs": cost.macs})
        out["cgmq.bits"] = json.dumps({name: list(b) for name, b in qm.bits().items()})
        out["cgmq.range_marker"] = (f"DequantizeLinear node metadata {qdq_types.RANGE_KEY}='lo,hi' marks a weight "
                                    "stored in a wider integer container; its true width covers [lo, hi]")
    for key, value in (user or {}).items():
        key = key if key.startswith("cgmq.") else f"cgmq.{key}"
        out[key] = value if isinstance(value, str) else json.dumps(value)
    return out


PORTABLE_OPSET = 21  # --portable: int4/uint4 types; OpenVINO 2026 cannot load the opset-25 int2/uint2 types


def portable_containers(qm) -> dict[str, int]:
    """Activation key -> 8 for every sub-8-bit activation that a layer with 8-bit weights reads (``--portable``)."""
    widths = qm.widths()
    out: dict[str, int] = {}
    for layer in qm.layers:
        if layer.weight_key is not None and widths[layer.weight_key] == 8:
            out.update({key: 8 for key in layer.act_keys if widths[key] < 8})
    return out


def _layers(qm, records: list[Rewritten], opset: int, containers: dict[str, int]) -> tuple[ExportedLayer, ...]:
    by_layer = {rec.layer: rec for rec in records}
    qs = qm.tensor_quantizers()
    out = []
    for layer, shape in zip(qm.layers, qm.shapes):
        rec = by_layer.get(layer.name)
        if rec is None:
            raise ExportError(f"layer `{layer.name}` was not found in the exported graph", "please report this model")
        bits_w, bits_a = shape.bits(qm.widths())
        act = qdq_types.storage(bits_a, qs[shape.act_key].is_signed, opset, container=containers.get(shape.act_key, 0)) \
            if shape.act_key else None
        weight = rec.weight
        if layer.weight_key is None:  # an activation product: its right operand sits in the weight slot
            weight = qdq_types.storage(bits_w, qs[shape.weight_key].is_signed, opset,
                                       container=containers.get(shape.weight_key, 0))
        out.append(ExportedLayer(name=layer.name, node=rec.node, op=rec.op, bits_w=bits_w, bits_a=bits_a,
                                 weight_type=_type_label(weight), act_type=_type_label(act)))
    return tuple(out)


def _type_label(st: qdq_types.Storage | None) -> str:
    if st is None:
        return "float"
    return st.type_name + (f" (holds {st.bits}-bit)" if st.is_container else "")


def _build(qm, opset: int, metadata: dict | None, float_only: bool,
           containers: dict[str, int] | None = None) -> tuple[onnx.ModelProto, list[Rewritten], bool]:
    if not qdq_types.MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"--opset {opset} is outside {qdq_types.MIN_OPSET}..{onnx.defs.onnx_opset_version()}",
                          "use --opset 25 (2-bit types), 21 (4/16-bit types) or 17 (8-bit containers)")
    if not float_only:  # fail early, naming the tensor, when a width has no type at this opset
        for key, bits in qm.widths().items():
            qdq_types.storage(bits, True, opset, f"the {qm.tensors[key].label}")
    was_training = qm.gm.training
    qm.gm.eval()
    try:
        module, marks = _marked_module(qm, float_only)
        model, dynamic = _torch_export(module, qm.sample_shape, opset, qm.sample_dtype)
    finally:
        qm.gm.train(was_training)
    records = rewrite(model, marks, opset, containers)
    if opsets.opset_of(model) != opset:
        model = opsets.convert_down(model, opset)
    if opsets.opset_of(model) != opset:
        raise ExportError(f"could not produce opset {opset} (got opset {opsets.opset_of(model)})", "use --opset 18 or higher")
    _finalize(model, opset, _metadata(qm, opset, metadata, float_only))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported graph fails onnx.checker: {str(exc).strip().splitlines()[0][:300]}",
                          "please report this model") from None
    if model.ByteSize() > MAX_PROTO_BYTES:
        raise ExportError("the exported model is larger than 2 GiB, the protobuf limit", "export a smaller model")
    return model, records, dynamic


def _write(model: onnx.ModelProto, path: Path, check) -> None:
    """Write ``model`` to a temporary file next to ``path``, run ``check(tmp)``, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent)  # short name (any legal file name works), normal permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        check(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _random_inputs(qm, n: int = PARITY_EXAMPLES, batch: int = 32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [_example((min(batch, n - i), *qm.sample_shape), qm.sample_dtype, "cpu", gen) for i in range(0, n, batch)]


def export_qdq(
    qm,
    path: str | os.PathLike,
    opset: int = 25,
    metadata: dict | None = None,
    *,
    check: bool = True,
    parity_inputs: Iterable[torch.Tensor] | None = None,
    min_agreement: float = MIN_AGREEMENT,
    allow_float_fallback: bool = False,
    portable: bool = False,
) -> ExportInfo:
    """Export ``qm`` at its current widths to a QDQ ONNX file at ``path``.

    With ``check`` (the default) the file must pass onnx.checker, read back
    (:func:`verify.read_widths`) with exactly the cost model's BOPs and weight
    bytes, load in an onnxruntime CPU session with default options, and agree
    with the PyTorch quantized model on ``parity_inputs`` (default: 64 seeded
    random inputs) in at least ``min_agreement`` percent of top-1
    predictions; otherwise :class:`ExportError` / :class:`ParityError` and no
    file is written (the checks run on the temporary file). Where the default
    session, whose integer kernels requantize with their own rounding, falls
    short, the file's exact meaning (graph optimizations off) must agree
    instead, and both agreements are returned in :attr:`ExportInfo.parity`.
    ``metadata`` is stored in metadata_props as ``cgmq.<key>`` (JSON values).

    On a profile with integer kernels (``qm.integer_ops``) the check also
    holds the file to them (:mod:`cgmq_cli.export.diagnose`): every 8/8 layer
    and every fully 8-bit residual add, concat and pooling op must become an
    integer kernel in onnxruntime, else :class:`CheckFailedError` naming the
    op and the pattern that blocked it; with ``allow_float_fallback`` the
    findings are returned in :attr:`ExportInfo.kernels` instead.

    ``portable`` writes the containers every runtime cgmq tests reads
    (:data:`PORTABLE_OPSET` or older, 8-bit containers for sub-8-bit inputs of
    8-bit-weight layers; see :mod:`cgmq_cli.export.qdq_types`).
    """
    containers = {}
    if portable:
        if opset > PORTABLE_OPSET:
            raise ExportError(f"--portable writes opset {PORTABLE_OPSET} or older, not --opset {opset}",
                              f"drop --opset, or use --opset {PORTABLE_OPSET} or lower")
        containers = portable_containers(qm)
        metadata = {**(metadata or {}), "portable": "true"}
    model, records, dynamic = _build(qm, opset, metadata, float_only=False, containers=containers)
    layers = _layers(qm, records, opset, containers)
    result = {}

    def _check(tmp: Path) -> None:
        if not check:
            return
        read, cost = verify.read_widths(tmp, runtime=False), qm.cost()
        rows = {r.node: r for r in read.layers}  # the compute nodes cgmq named after its layers
        missing = [layer.name for layer in qm.layers if layer.name not in rows]
        if missing:
            raise ExportError(f"layer `{missing[0]}` is not a compute node of the written file",
                              "please report this model; the file was not written")
        mine = [rows[layer.name] for layer in qm.layers]
        pairs = (("BOPs", sum(r.bops for r in mine), sum(layer.bops for layer in cost.layers)),
                 ("weight bytes", sum(r.weight_bytes for r in mine), sum(layer.weight_bytes for layer in cost.layers)))
        for label, got, want in pairs:
            if got != want:
                raise ExportError(f"the file reads back as {got:,} {label} but the cost model says {want:,}",
                                  "please report this model; the file was not written")
        verify.load_session(tmp)
        if qm.integer_ops:
            result["kernels"] = diagnose.check_file(tmp, qm.integer_ops, Path(path).name)
            if not allow_float_fallback:
                diagnose.require(result["kernels"], f"profile {metadata['profile']}" if metadata and
                                 isinstance(metadata.get("profile"), str) else "the profile")
        inputs = list(parity_inputs) if parity_inputs is not None else _random_inputs(qm)
        res = verify.parity(qm, tmp, inputs)
        if res.agreement < min_agreement:
            # onnxruntime's fused integer kernels requantize with their own rounding, which can move a low-bit
            # activation to the next level; only the file's exact meaning (no fusion) must match PyTorch
            exact = verify.parity(qm, tmp, inputs, optimize=False)
            if exact.agreement < min_agreement:
                raise ParityError(f"onnxruntime agrees with PyTorch on {exact.agreement:.2f}% of top-1 predictions "
                                  f"(< {min_agreement}%) with graph optimizations off and {res.agreement:.2f}% with "
                                  f"them on, max |logit diff| {exact.max_abs_diff:.3g}",
                                  "please report this model; the file was not written")
            res = replace(res, file_agreement=exact.agreement, file_max_abs_diff=exact.max_abs_diff)
        result["parity"] = res

    _write(model, Path(path), _check)
    return ExportInfo(path=Path(path), opset=opset, size_bytes=os.path.getsize(path), layers=layers,
                      dynamic_batch=dynamic, metadata={p.key: p.value for p in model.metadata_props},
                      parity=result.get("parity"), kernels=result.get("kernels", ()))


def export_float(qm, path: str | os.PathLike, opset: int = 25, *, check: bool = True) -> ExportInfo:
    """Export the float model (BN folded, quantizers bypassed) for comparison.

    With ``check`` the file must pass onnx.checker and load in onnxruntime.
    """
    model, records, dynamic = _build(qm, opset, None, float_only=True)
    layers = _layers(qm, records, opset, {})
    _write(model, Path(path), (lambda tmp: verify.load_session(tmp)) if check else (lambda tmp: None))
    return ExportInfo(path=Path(path), opset=opset, size_bytes=os.path.getsize(path), layers=layers,
                      dynamic_batch=dynamic, metadata={p.key: p.value for p in model.metadata_props})
