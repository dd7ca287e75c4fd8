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

from cgmq_cli.errors import ExportError
from cgmq_cli.export.qdq_types import RANGE_KEY, Storage, storage
from cgmq_cli.quant import functional as QF

MARK_DOMAIN = "cgmq"
MARK_OP = "Mark"
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Mark:
    """What one marker stands for: a layer's weight or input at one call site."""

    layer: str
    role: str  # "weight" | "act"
    call: int
    bits: int
    signed: bool
    step: torch.Tensor | None  # positive step: () for activations, (C,) or () for weights
    weight: torch.Tensor | None = None  # the (BN-folded) float weight, role "weight"
    bias: torch.Tensor | None = None  # the layer's float bias, role "weight" (None: no bias)


@dataclass(frozen=True)
class Rewritten:
    """One layer call as it ended up in the file."""

    layer: str
    call: int
    node: str
    op: str
    weight: Storage | None
    act: Storage | None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _copy(message, cls):
    new = cls()
    new.CopyFrom(message)
    return new


def _suffix(call: int) -> str:
    return f"#{call}" if call else ""


class _Rewriter:
    def __init__(self, model: onnx.ModelProto, marks: list[Mark], opset: int) -> None:
        self.model, self.marks, self.opset = model, marks, opset
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
        self.records: dict[tuple[str, int], dict] = {}
        self.weight_bits = {(m.layer, m.call): m.bits for m in marks if m.role == "weight"}

    # -- helpers ---------------------------------------------------------------
    def _add_init(self, array: np.ndarray, name: str) -> str:
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(array, name)
        return name

    def _record(self, mark: Mark, **kw) -> None:
        self.records.setdefault((mark.layer, mark.call), {}).update(kw)

    def _compute_node(self, node: onnx.NodeProto, mark: Mark) -> None:
        node.name = mark.layer + _suffix(mark.call)
        self._record(mark, node=node.name, op=node.op_type)

    # -- activations -----------------------------------------------------------
    def act(self, node: onnx.NodeProto, mark: Mark) -> list[onnx.NodeProto]:
        src, out = node.input[0], node.output[0]
        for user in self.consumers[out]:
            if user.op_type in COMPUTE_OPS:
                self._compute_node(user, mark)
        st = storage(mark.bits, mark.signed, self.opset, f"the input of layer `{mark.layer}`")
        self._record(mark, act=st)
        if st is None:
            self.rename[out] = src
            return []
        p = f"{mark.layer}/act{_suffix(mark.call)}"
        dtype = helper.tensor_dtype_to_np_dtype(st.elem_type)
        step = np.float32(mark.step.detach().cpu().float().item())
        scale = self._add_init(np.array(step, np.float32), f"{p}/scale")
        zero = self._add_init(np.zeros((), dtype), f"{p}/zero_point")
        lo, hi = st.grid
        nodes = []
        if st.bits != 8:  # range guard, see qdq_types
            nodes += self._guard(src, f"{p}/guarded", lo, hi, step, p)
            src = f"{p}/guarded"
        nodes.append(helper.make_node("QuantizeLinear", [src, scale, zero], [f"{p}/q"], name=f"{p}/QuantizeLinear"))
        codes = f"{p}/q"
        if st.clip == "int":  # 8-bit container: narrow the codes to [lo, hi]
            bounds = [self._add_init(np.array(v, dtype), f"{p}/code_{k}") for k, v in (("min", lo), ("max", hi))]
            nodes.append(helper.make_node("Clip", [codes, *bounds], [f"{p}/q_clipped"], name=f"{p}/ClipCodes"))
            codes = f"{p}/q_clipped"
        w_st = storage(self.weight_bits.get((mark.layer, mark.call), 32), True, self.opset)
        post_guard = st.container_bits == 8 and w_st is not None and w_st.elem_type != onnx.TensorProto.INT8
        dq_out = f"{p}/dq" if post_guard else out
        dq = helper.make_node("DequantizeLinear", [codes, scale, zero], [dq_out], name=f"{p}/DequantizeLinear")
        if st.is_container:
            helper.set_metadata_props(dq, {RANGE_KEY: f"{lo},{hi}"})
        nodes.append(dq)
        if post_guard:  # 8-bit input, non-int8 weight: keep onnxruntime from fusing it (see qdq_types)
            nodes += self._guard(dq_out, out, lo, hi, step, f"{p}/post")
        return nodes

    def _guard(self, src: str, out: str, lo: int, hi: int, step: np.float32, p: str) -> list[onnx.NodeProto]:
        """``Min(Max(src, lo*s), hi*s)``: a no-op on the grid [lo, hi] with step s."""
        low = self._add_init(np.array(np.float32(lo) * step, np.float32), f"{p}/range_min")
        high = self._add_init(np.array(np.float32(hi) * step, np.float32), f"{p}/range_max")
        return [helper.make_node("Max", [src, low], [f"{p}/above"], name=f"{p}/RangeMax"),
                helper.make_node("Min", [f"{p}/above", high], [out], name=f"{p}/RangeMin")]

    # -- weights ---------------------------------------------------------------
    def weight(self, node: onnx.NodeProto, mark: Mark) -> None:
        out = node.output[0]
        users = self.consumers[out]
        if len(users) != 1:
            raise ExportError(f"layer `{mark.layer}`: its weight has {len(users)} consumers in the exported graph",
                              "please report this model; cgmq expects one Conv/Gemm/MatMul per call")
        user = users[0]
        if user.op_type == "Conv" and user.input[1] == out:
            self._compute_node(user, mark)
            self.replace[id(node)] = self._weight_nodes(mark, out, transposed=False)
            if mark.bias is not None and (len(user.input) < 3 or not user.input[2]):
                del user.input[2:]  # torch.onnx dropped an all-zero bias: restore it
                user.input.append(self._bias_init(mark))
            return
        if user.op_type == "Transpose" and list(_attr(user, "perm", [])) == [1, 0]:
            mms = self.consumers[user.output[0]]
            if len(mms) == 1 and mms[0].op_type == "MatMul" and mms[0].input[1] == user.output[0]:
                mm = mms[0]
                self._compute_node(mm, mark)
                self.replace[id(node)] = []
                self.replace[id(user)] = self._weight_nodes(mark, user.output[0], transposed=True)
                if mark.bias is not None and not any(c.op_type == "Add" for c in self.consumers[mm.output[0]]):
                    self.replace[id(mm)] = self._with_bias(mm, mark)
                return
        if user.op_type == "Gemm" and user.input[1] == out and self._plain_gemm(user):
            self.replace[id(node)] = self._weight_nodes(mark, out, transposed=True)
            self.replace[id(user)] = self._gemm_as_matmul(user, mark)
            return
        raise ExportError(f"layer `{mark.layer}`: torch.onnx produced an unexpected consumer "
                          f"`{user.op_type}` for its weight",
                          "please report this model (cgmq rewrites Conv, Gemm and Transpose->MatMul)")

    @staticmethod
    def _plain_gemm(node: onnx.NodeProto) -> bool:
        return (_attr(node, "transA", 0) == 0 and _attr(node, "transB", 0) == 1
                and float(_attr(node, "alpha", 1.0)) == 1.0 and float(_attr(node, "beta", 1.0)) == 1.0)

    def _bias_init(self, mark: Mark) -> str:
        return self._add_init(mark.bias.detach().cpu().float().contiguous().numpy(), f"{mark.layer}.bias")

    def _with_bias(self, mm: onnx.NodeProto, mark: Mark) -> list[onnx.NodeProto]:
        """``mm`` followed by an Add of the layer's bias, under the original output name."""
        out = mm.output[0]
        new = _copy(mm, onnx.NodeProto)
        new.output[0] = f"{new.name}/matmul"
        return [new, helper.make_node("Add", [new.output[0], self._bias_init(mark)], [out], name=f"{new.name}/bias")]

    def _gemm_as_matmul(self, gemm: onnx.NodeProto, mark: Mark) -> list[onnx.NodeProto]:
        name = mark.layer + _suffix(mark.call)
        bias = gemm.input[2] if len(gemm.input) > 2 and gemm.input[2] else None
        if bias is None and mark.bias is not None:  # torch.onnx dropped an all-zero bias: restore it
            bias = self._bias_init(mark)
        mm_out = f"{name}/matmul" if bias else gemm.output[0]
        nodes = [helper.make_node("MatMul", [gemm.input[0], gemm.input[1]], [mm_out], name=name)]
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, bias], [gemm.output[0]], name=f"{name}/bias"))
        self._record(mark, node=name, op="MatMul")
        return nodes

    def _weight_nodes(self, mark: Mark, out: str, transposed: bool) -> list[onnx.NodeProto]:
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
                                              f"{mark.layer}.weight{layout}")
            return []
        step = mark.step.detach().cpu().float()
        qmin, qmax = st.grid
        codes = QF.quantize_codes(w, QF.channel_view(step, w.ndim), qmin, qmax)
        axis = None
        if step.ndim:
            axis = 1 if transposed else 0
        if transposed:
            codes = codes.T
        dtype = helper.tensor_dtype_to_np_dtype(st.elem_type)
        p = f"{mark.layer}.weight{layout}"
        q = self._add_init(codes.contiguous().numpy().astype(dtype), f"{p}_q")
        scale = self._add_init(step.numpy().astype(np.float32), f"{p}_scale")
        zero = self._add_init(np.zeros(tuple(step.shape), dtype), f"{p}_zero_point")
        kw = {} if axis is None else {"axis": axis}
        dq = helper.make_node("DequantizeLinear", [q, scale, zero], [out],
                              name=f"{mark.layer}/weight{_suffix(mark.call)}/DequantizeLinear", **kw)
        if st.is_container:
            helper.set_metadata_props(dq, {RANGE_KEY: f"{qmin},{qmax}"})
        return [dq]

    # -- driver ----------------------------------------------------------------
    def run(self) -> list[Rewritten]:
        for node in self.nodes:
            if node.domain != MARK_DOMAIN:
                continue
            if node.op_type != MARK_OP or _attr(node, "idx") is None:
                raise ExportError(f"unexpected node {node.domain}.{node.op_type} in the export", "please report this")
            mark = self.marks[int(_attr(node, "idx"))]
            if mark.role == "act":
                self.replace[id(node)] = self.act(node, mark)
            else:
                self.weight(node, mark)
        self._rebuild()
        return [Rewritten(layer=k[0], call=k[1], node=r.get("node", ""), op=r.get("op", ""),
                          weight=r.get("weight"), act=r.get("act")) for k, r in self.records.items()]

    def _unshare(self, nodes: list[onnx.NodeProto], originals: dict[str, onnx.TensorProto]) -> None:
        """Give each layer its own bias / float weight initializer.

        torch.onnx's optimizer merges initializers with equal values (e.g. the
        all-zero biases of freshly BN-folded convs); read back, the file would
        then store fewer bytes than the cost model counts for its layers. Call
        sites of one layer keep sharing theirs.
        """
        layer_of = {r["node"]: layer for (layer, _), r in self.records.items() if "node" in r}
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

    def _rebuild(self) -> None:
        g = self.graph
        final = [_copy(new, onnx.NodeProto) for node in self.nodes for new in self.replace.get(id(node), [node])]
        for node in final:
            for i, name in enumerate(node.input):
                while name in self.rename:
                    name = self.rename[name]
                node.input[i] = name
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


def rewrite(model: onnx.ModelProto, marks: list[Mark], opset: int) -> list[Rewritten]:
    """Replace every ``cgmq.Mark`` in ``model`` (in place); one record per layer call."""
    return _Rewriter(model, marks, opset).run()
