"""Replace the ``cgmq.Mark`` placeholders of a torch.onnx export by standard Q/DQ.

torch.onnx exports the model with every quantizer replaced by a marker node
``cgmq.Mark(idx)`` (see :mod:`cgmq_cli.export.onnx_qdq`). This pass turns each
marker into standard operators and leaves no custom op behind:

* activation marker -> ``QuantizeLinear -> DequantizeLinear`` (scalar scale,
  zero point 0 of the width's type), preceded by a ``Max/Min`` range guard
  when the width is not 8, with an integer ``Clip`` in between in an 8-bit
  container, and followed by a guard when the input is 8-bit but the layer's
  weight is not int8 (see :mod:`cgmq_cli.export.qdq_types` for why); at 32
  bits the marker is just removed;
* weight marker -> an integer initializer of codes (computed with the fake
  quantizer's own rounding, so bit-identical), per output channel (``axis``
  set), feeding ``DequantizeLinear``; at 32 bits a float initializer.

Biases stay float32: exact parity with PyTorch, 4 bytes per element as the
cost model counts them; onnxruntime still fuses 8-bit layers into integer
kernels (it quantizes a float bias to int32 itself).

Every weight is stored in the layout its consumer takes: Conv takes
``[Cout, Cin/g, k...]`` (axis 0); a linear layer becomes ``MatMul`` with a
pre-transposed ``[in, out]`` weight (axis 1) plus ``Add`` for the bias. That
avoids two onnxruntime 1.32 load failures: QDQ ``Gemm`` fused into ``QGemm``
rejects 2-bit types, and a 2-bit ``DequantizeLinear -> Transpose -> MatMul``
breaks constant folding. The compute node of each layer is renamed to the
layer's name (``#k`` appended for its k-th extra call site).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from cgmq_cli import ops
from cgmq_cli.errors import ExportError
from cgmq_cli.export.qdq_types import RANGE_KEY, Storage, storage
from cgmq_cli.quant import functional as QF

MARK_DOMAIN = "cgmq"
MARK_OP = "Mark"


@dataclass(frozen=True)
class Mark:
    """What one marker stands for: an activation tensor (or an alias of one), or a layer's weight at one call."""

    key: str  # the quantizer's key
    role: str  # "act" | "alias" | "weight" | "compute" (names the node that computes an activation product)
    layer: str  # role "weight": the layer call (its compute node takes this name)
    bits: int
    signed: bool
    step: torch.Tensor | None  # positive step: () for activations, (C,) or () for weights
    zero_point: int = 0  # integer zero point of an asymmetric activation
    grid: tuple[int, int] | None = None  # the quantizer's integer codes [qmin, qmax] (reduced range included)
    weight: torch.Tensor | None = None  # the (BN-folded) float weight, role "weight"
    bias: torch.Tensor | None = None  # the layer's float bias, role "weight" (None: no bias)
    integer: bool = False  # role "weight": the layer runs as an integer kernel on this profile
    tensor: str = ""  # role "weight": the weight attribute, e.g. "fc.weight" (names its initializers)
    act_step: float | None = None  # role "weight", integer layers: the input's step (int32 bias scale)
    axis: int = 0  # role "weight": the per-channel axis of the weight in PyTorch's layout

    @property
    def base(self) -> str:
        """The layer without its call-site suffix: call sites of one layer share weight and bias."""
        return self.layer.split("#")[0]


@dataclass(frozen=True)
class Rewritten:
    """One layer call as it ended up in the file."""

    layer: str
    node: str
    op: str
    weight: Storage | None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _copy(message, cls):
    new = cls()
    new.CopyFrom(message)
    return new


class _Rewriter:
    def __init__(self, model: onnx.ModelProto, marks: list[Mark], opset: int,
                 containers: dict[str, int] | None = None) -> None:
        self.model, self.marks, self.opset = model, marks, opset
        self.containers = containers or {}  # activation key -> least container bits (--portable)
        self.graph = model.graph
        self.nodes = list(self.graph.node)  # kept alive: replacements are keyed by id()
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers[name].append(node)
            for name in node.output:
                self.producer[name] = node
        self.replace: dict[int, list[onnx.NodeProto]] = {}
        self.rename: dict[str, str] = {}
        self.inits: dict[str, onnx.TensorProto] = {}
        self.records: dict[str, dict] = {}
        self.integer_layers: set[str] = set()  # compute nodes (by name) that run as integer kernels
        self.guarded: dict[str, str] = {}  # 8-bit DQ output -> its guarded copy, read by the other compute nodes
        self.aliases = 0

    # -- helpers (also used by the op registry's export_weight) -----------------
    def _add_init(self, array: np.ndarray, name: str) -> str:
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(array, name)
        return name

    def _record(self, mark: Mark, **kw) -> None:
        self.records.setdefault(mark.layer, {}).update(kw)

    def compute_node(self, node: onnx.NodeProto, mark: Mark) -> None:
        """Name the compute node after the layer call and remember how it runs."""
        node.name = mark.layer
        self._record(mark, node=node.name, op=node.op_type)
        if mark.integer:
            self.integer_layers.add(mark.layer)

    def sole_consumer(self, out: str, mark: Mark) -> onnx.NodeProto:
        users = self.consumers[out]
        if len(users) != 1:
            raise ExportError(f"layer `{mark.layer}`: its weight has {len(users)} consumers in the exported graph",
                              "please report this model; cgmq expects one Conv/Gemm/MatMul per call")
        return users[0]

    # -- activations -----------------------------------------------------------
    def act(self, node: onnx.NodeProto, mark: Mark) -> list[onnx.NodeProto]:
        """``Q -> DQ`` of one tensor (an alias reuses the tensor's scale and zero point)."""
        src, out = node.input[0], node.output[0]
        st = storage(mark.bits, mark.signed, self.opset, f"tensor `{mark.key}`", self.containers.get(mark.key, 0))
        if st is None:
            self.rename[out] = src
            return []
        p = mark.key
        if mark.role == "alias":
            self.aliases += 1
            p = f"{mark.key}/alias{self.aliases}"
        dtype = helper.tensor_dtype_to_np_dtype(st.elem_type)
        step = np.float32(mark.step.detach().cpu().float().item())
        scale = self._add_init(np.array(step, np.float32), f"{mark.key}/scale")
        zero = self._add_init(np.array(mark.zero_point, dtype), f"{mark.key}/zero_point")
        lo, hi = mark.grid or st.grid
        z = mark.zero_point
        nodes = []
        if st.bits != 8:  # range guard, see qdq_types
            nodes += self._guard(src, f"{p}/guarded", lo - z, hi - z, step, p)
            src = f"{p}/guarded"
        nodes.append(helper.make_node("QuantizeLinear", [src, scale, zero], [f"{p}/q"], name=f"{p}/QuantizeLinear"))
        codes = f"{p}/q"
        if st.clip == "int":  # 8-bit container: narrow the codes to [lo, hi]
            bounds = [self._add_init(np.array(v, dtype), f"{mark.key}/code_{k}") for k, v in (("min", lo), ("max", hi))]
            nodes.append(helper.make_node("Clip", [codes, *bounds], [f"{p}/q_clipped"], name=f"{p}/ClipCodes"))
            codes = f"{p}/q_clipped"
        dq = helper.make_node("DequantizeLinear", [codes, scale, zero], [out], name=f"{p}/DequantizeLinear")
        if st.is_container:
            helper.set_metadata_props(dq, {RANGE_KEY: f"{lo},{hi}"})
        nodes.append(dq)
        if st.container_bits == 8 and any(u.op_type in ops.ONNX_COMPUTE_TYPES for u in self.consumers[out]):
            # keep onnxruntime's integer fusions to the layers that run as integer kernels on the profile:
            # every other compute node reads a guarded copy (see _rebuild)
            nodes += self._guard(out, f"{p}/float", lo - z, hi - z, step, f"{p}/post")
            self.guarded[out] = f"{p}/float"
        return nodes

    def _guard(self, src: str, out: str, lo: int, hi: int, step: np.float32, p: str) -> list[onnx.NodeProto]:
        """``Min(Max(src, lo*s), hi*s)``: a no-op on the grid [lo, hi] with step s."""
        low = self._add_init(np.array(np.float32(lo) * step, np.float32), f"{p}/range_min")
        high = self._add_init(np.array(np.float32(hi) * step, np.float32), f"{p}/range_max")
        return [helper.make_node("Max", [src, low], [f"{p}/above"], name=f"{p}/RangeMax"),
                helper.make_node("Min", [f"{p}/above", high], [out], name=f"{p}/RangeMin")]

    def product(self, node: onnx.NodeProto, mark: Mark) -> None:
        """The node that computes an activation x activation product: named after its layer; the marker goes."""
        producer = self.producer.get(node.input[0])
        if producer is None or producer.op_type not in ops.ONNX_COMPUTE_TYPES:
            raise ExportError(f"layer `{mark.layer}`: torch.onnx wrote it as "
                              f"`{producer.op_type if producer is not None else 'nothing'}`, not a MatMul",
                              "please report this model")
        self.compute_node(producer, mark)
        self.rename[node.output[0]] = node.input[0]
        self.replace[id(node)] = []

    # -- weights ---------------------------------------------------------------
    def weight(self, node: onnx.NodeProto, mark: Mark) -> None:
        """Store the weight in the layout its consumer takes (the op registry knows each op's layout)."""
        for op in ops.COMPUTE_OPS:
            if op.export_weight(self, node, mark):
                return
        user = self.sole_consumer(node.output[0], mark)
        raise ExportError(f"layer `{mark.layer}`: torch.onnx produced an unexpected consumer "
                          f"`{user.op_type}` for its weight",
                          "please report this model (cgmq rewrites Conv, Gemm and Transpose->MatMul)")

    def bias_init(self, mark: Mark) -> str:
        return self._add_init(mark.bias.detach().cpu().float().contiguous().numpy(), f"{mark.base}.bias")

    def int32_bias(self, mark: Mark) -> list[onnx.NodeProto]:
        """The bias as int32 codes ``round(b / (s_a * s_w))`` behind a DequantizeLinear (as onnxruntime's
        own quantizer writes it; its QGemm fusion needs it)."""
        scale = (np.float32(mark.act_step) * mark.step.detach().cpu().float().numpy()).astype(np.float32)
        codes = np.round(mark.bias.detach().cpu().float().numpy() / scale).astype(np.int32)
        p = f"{mark.base}.bias"
        q = self._add_init(codes, f"{p}_q")
        s = self._add_init(scale.reshape(mark.step.shape), f"{p}_scale")
        z = self._add_init(np.zeros(tuple(mark.step.shape), np.int32), f"{p}_zero_point")
        kw = {"axis": 0} if mark.step.ndim else {}
        return [helper.make_node("DequantizeLinear", [q, s, z], [f"{p}/dq"], name=f"{mark.layer}/bias/DequantizeLinear", **kw)]

    def with_bias(self, mm: onnx.NodeProto, mark: Mark) -> list[onnx.NodeProto]:
        """``mm`` followed by an Add of the layer's bias, under the original output name."""
        out = mm.output[0]
        new = _copy(mm, onnx.NodeProto)
        new.output[0] = f"{new.name}/matmul"
        return [new, helper.make_node("Add", [new.output[0], self.bias_init(mark)], [out], name=f"{new.name}/bias")]

    def gemm_as_matmul(self, gemm: onnx.NodeProto, mark: Mark) -> list[onnx.NodeProto]:
        name = mark.layer
        bias = gemm.input[2] if len(gemm.input) > 2 and gemm.input[2] else None
        if bias is None and mark.bias is not None:  # torch.onnx dropped an all-zero bias: restore it
            bias = self.bias_init(mark)
        mm_out = f"{name}/matmul" if bias else gemm.output[0]
        nodes = [helper.make_node("MatMul", [gemm.input[0], gemm.input[1]], [mm_out], name=name)]
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, bias], [gemm.output[0]], name=f"{name}/bias"))
        self._record(mark, node=name, op="MatMul")
        return nodes

    def weight_nodes(self, mark: Mark, out: str, transposed: bool) -> list[onnx.NodeProto]:
        """Nodes that produce the weight, in the consumer's layout, under the name ``out``."""
        w = mark.weight.detach().cpu().float()
        st = storage(mark.bits, True, self.opset, f"the weight of layer `{mark.layer}`")
        self._record(mark, weight=st)
        layout = "_t" if transposed else ""
        if transposed and w.ndim != 2:
            raise ExportError(f"layer `{mark.layer}`: cannot transpose a {w.ndim}-D linear weight",
                              "please report this model")
        if st is None:
            self.rename[out] = self._add_init((w.T if transposed else w).contiguous().numpy(),
                                              f"{mark.tensor}{layout}")
            return []
        step = mark.step.detach().cpu().float()
        qmin, qmax = mark.grid or st.grid
        codes = QF.quantize_codes(w, QF.channel_view(step, w.ndim, mark.axis % w.ndim), qmin, qmax)
        axis = None
        if step.ndim:  # the channel axis in the stored layout
            axis = (1 - mark.axis % 2) if transposed else mark.axis % w.ndim
        if transposed:
            codes = codes.T
        dtype = helper.tensor_dtype_to_np_dtype(st.elem_type)
        p = f"{mark.tensor}{layout}"
        q = self._add_init(codes.contiguous().numpy().astype(dtype), f"{p}_q")
        scale = self._add_init(step.numpy().astype(np.float32), f"{p}_scale")
        zero = self._add_init(np.zeros(tuple(step.shape), dtype), f"{p}_zero_point")
        kw = {} if axis is None else {"axis": axis}
        # A MatMul that is not an integer kernel reads the weight through a range guard: onnxruntime
        # 1.32 otherwise turns DQ -> MatMul into MatMulNBits, which quantizes the activation to int8
        # on the fly (its default accuracy level 4) and no longer computes the QDQ model's values.
        guard = transposed and not mark.integer
        dq_out = f"{mark.layer}/weight/dq" if guard else out
        dq = helper.make_node("DequantizeLinear", [q, scale, zero], [dq_out],
                              name=f"{mark.layer}/weight/DequantizeLinear", **kw)
        if st.is_container:
            helper.set_metadata_props(dq, {RANGE_KEY: f"{qmin},{qmax}"})
        if not guard:
            return [dq]
        top = np.float32(step.max().item())
        return [dq, *self._guard(dq_out, out, qmin, qmax, top, f"{mark.layer}/weight/guard")]

    # -- driver ----------------------------------------------------------------
    def run(self) -> list[Rewritten]:
        found = []
        for node in self.nodes:
            if node.domain != MARK_DOMAIN:
                continue
            if node.op_type != MARK_OP or _attr(node, "idx") is None:
                raise ExportError(f"unexpected node {node.domain}.{node.op_type} in the export", "please report this")
            found.append((node, self.marks[int(_attr(node, "idx"))]))
        for node, mark in found:  # weights first: an activation's Q/DQ depends on how its readers run
            if mark.role == "weight":
                self.weight(node, mark)
            elif mark.role == "compute":
                self.product(node, mark)
        for node, mark in found:
            if mark.role in ("act", "alias"):
                self.replace[id(node)] = self.act(node, mark)
        self._rebuild()
        return [Rewritten(layer=k, node=r.get("node", ""), op=r.get("op", ""), weight=r.get("weight"))
                for k, r in self.records.items()]

    def _unshare(self, nodes: list[onnx.NodeProto], originals: dict[str, onnx.TensorProto]) -> None:
        """Give each layer its own bias / float weight initializer.

        torch.onnx's optimizer merges initializers with equal values (e.g. the
        all-zero biases of freshly BN-folded convs); read back, the file would
        then store fewer bytes than the cost model counts for its layers. Call
        sites of one layer keep sharing theirs.
        """
        layer_of = {r["node"]: layer.split("#")[0] for layer, r in self.records.items() if "node" in r}
        consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in nodes:
            for name in node.input:
                consumers[name].append(node)
        owner: dict[str, str] = {}
        for node in nodes:
            layer = layer_of.get(node.name)
            if layer is None:
                continue
            slots = [(node, 1, "weight")] + ([(node, 2, "bias")] if node.op_type == "Conv" else [])
            if node.op_type == "MatMul":
                slots += [(add, i, "bias") for add in consumers[node.output[0]] if add.op_type == "Add"
                          for i, name in enumerate(add.input) if name != node.output[0]]
            for user, i, role in slots:
                name = user.input[i] if i < len(user.input) else ""
                if name not in originals and name not in self.inits:
                    continue
                if owner.setdefault(name, layer) != layer:
                    source = originals.get(name) or self.inits[name]
                    copy = _copy(source, onnx.TensorProto)
                    copy.name = f"{layer}.{role}_unshared"
                    self.inits.setdefault(copy.name, copy)
                    user.input[i] = copy.name

    def _drop_unread_guards(self, final: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        """Remove post-DQ guards that no node reads (every reader runs as an integer kernel)."""
        while True:
            read = {name for node in final for name in node.input} | {o.name for o in self.graph.output}
            dead = {id(n) for n in final if n.name.endswith(("/post/RangeMax", "/post/RangeMin")) and n.output[0] not in read}
            if not dead:
                return final
            final = [n for n in final if id(n) not in dead]

    def _rebuild(self) -> None:
        g = self.graph
        final = [_copy(new, onnx.NodeProto) for node in self.nodes for new in self.replace.get(id(node), [node])]
        for node in final:
            for i, name in enumerate(node.input):
                while name in self.rename:
                    name = self.rename[name]
                if name in self.guarded and node.op_type in ops.ONNX_COMPUTE_TYPES and node.name not in self.integer_layers:
                    name = self.guarded[name]
                node.input[i] = name
        final = self._drop_unread_guards(final)
        originals = {t.name: t for t in g.initializer}
        self._unshare(final, originals)
        del g.node[:]
        g.node.extend(final)
        used = {name for node in final for name in node.input} | {o.name for o in g.output}
        kept = [_copy(t, onnx.TensorProto) for t in originals.values() if t.name in used and t.name not in self.inits]
        del g.initializer[:]
        g.initializer.extend(kept + [t for t in self.inits.values() if t.name in used])
        produced = {name for node in final for name in node.output}
        produced -= {name for nodes in self.replace.values() for node in nodes for name in node.output}
        vi = [_copy(v, onnx.ValueInfoProto) for v in g.value_info if v.name in produced]
        del g.value_info[:]
        g.value_info.extend(vi)
        kept_ops = [_copy(o, onnx.OperatorSetIdProto) for o in self.model.opset_import if o.domain != MARK_DOMAIN]
        del self.model.opset_import[:]
        self.model.opset_import.extend(kept_ops)


def rewrite(model: onnx.ModelProto, marks: list[Mark], opset: int,
            containers: dict[str, int] | None = None) -> list[Rewritten]:
    """Replace every ``cgmq.Mark`` in ``model`` (in place); one record per layer call.

    ``containers`` maps activation keys to the least container width to store them in.
    """
    return _Rewriter(model, marks, opset, containers).run()
