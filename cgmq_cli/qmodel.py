"""The prepared model: a traced GraphModule with gated quantizers, plus its layer and quantizer tables.

    prepare(model) = trace -> fold BatchNorm -> functional calls -> shapes -> insert quantizers

The same recipe rebuilds a saved run: trace the architecture again, prepare it
with the same settings, then load the saved state (folded weights, steps,
gates).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from cgmq_cli import cost
from cgmq_cli.errors import UsageError
from cgmq_cli.graph import coverage, passes, trace
from cgmq_cli.ops.base import attr_tensor
from cgmq_cli.quant.modules import GatedQuantizer

WidthsFn = passes.WidthsFn


def all_widths(name: str, op: str, index: int, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Default allowed widths when no profile narrows them."""
    return (2, 4, 8, 16, 32), (2, 4, 8, 16, 32)


@dataclass
class QuantizedModel:
    gm: fx.GraphModule
    layers: list[passes.LayerInfo]
    shapes: list[cost.LayerShape]
    sample_shape: tuple[int, ...]
    tensors: dict[str, passes.QuantizerInfo]
    integer_ops: frozenset[str] = frozenset()
    sample_dtype: torch.dtype = torch.float32
    float_ops: list = field(default_factory=list)  # coverage.FloatOp: compute left in float
    extras: cost.Extras = cost.Extras()

    # -- quantizers --------------------------------------------------------------
    def tensor_quantizers(self) -> dict[str, GatedQuantizer]:
        """Quantizer key -> quantizer (every weight and activation tensor)."""
        return passes.quantizers(self.gm)

    def quantizers(self) -> dict[str, tuple[GatedQuantizer, GatedQuantizer]]:
        """Layer call -> (weight quantizer, input quantizer); tensors read by several layers share one."""
        qs = self.tensor_quantizers()
        return {s.name: (qs.get(s.weight_key), qs.get(s.act_key)) for s in self.shapes}

    def all_quantizers(self) -> list[GatedQuantizer]:
        return list(self.tensor_quantizers().values())

    # -- widths ------------------------------------------------------------------
    def widths(self) -> dict[str, int]:
        """Quantizer key -> its current width."""
        return {key: q.bits for key, q in self.tensor_quantizers().items()}

    def set_widths(self, widths: dict[str, int]) -> None:
        qs = self.tensor_quantizers()
        for key, bits in widths.items():
            qs[key].set_bits(bits)

    def allowed(self) -> dict[str, tuple[int, ...]]:
        return {key: q.allowed for key, q in self.tensor_quantizers().items()}

    def bits(self) -> dict[str, tuple[int, int]]:
        """Layer call -> (weight bits, input bits)."""
        widths = self.widths()
        return {s.name: s.bits(widths) for s in self.shapes}

    def set_bits(self, bits: dict[str, tuple[int, int]]) -> None:
        """Set widths per layer call; a tensor that several layers read must get one width from all of them."""
        wanted: dict[str, int] = {}
        for s in self.shapes:
            if s.name not in bits:
                continue
            for key, value in zip((s.weight_key, s.act_key), bits[s.name]):
                if key is None:
                    continue
                if wanted.setdefault(key, value) != value:
                    raise ValueError(f"{self.tensors[key].label}: layers ask for {wanted[key]} and {value} bits")
        self.set_widths(wanted)

    def cost(self, mac_cost: cost.MacCost | None = None) -> cost.CostSummary:
        """Exact cost of the current integer widths (float compute and float parameters included)."""
        return cost.summarize(self.shapes, self.widths(), mac_cost, self.extras)

    # -- training modes ----------------------------------------------------------
    def weight_params(self) -> list[nn.Parameter]:
        """Everything a weight epoch trains: the model's parameters, steps and zero points, not the gates."""
        gates = {id(q.gate) for q in self.all_quantizers()} | {id(q.down_probe) for q in self.all_quantizers()}
        return [p for p in self.gm.parameters() if id(p) not in gates]

    def set_probing(self, on: bool, train_weights: bool = False) -> None:
        """Gate-epoch mode: gates and probes take gradients; weights and steps are frozen unless
        ``train_weights`` (they then train at the current widths in the same passes). ``False``: back."""
        for p in self.weight_params():
            p.requires_grad_(not on or train_weights)
        for q in self.all_quantizers():
            q.probing = on
            q.gate.requires_grad_(on)
            q.down_probe.requires_grad_(on)

    def set_table_probe(self, keys: Iterable[str] | None) -> None:
        """Table mode for the quantizers ``keys`` (None: off): weights frozen, every allowed width probed."""
        for p in self.weight_params():
            p.requires_grad_(keys is None)
        qs = self.tensor_quantizers()
        for q in qs.values():
            q.stop_table()
        for key in keys or ():
            qs[key].start_table()

    def table_grads(self, keys: Sequence[str]) -> dict[str, tuple[list[float], list[float]]]:
        """The accumulated table probes, first-order and sums of squares (one value per allowed width each),
        and reset them."""
        qs = self.tensor_quantizers()
        out = {}
        for key in keys:
            q = qs[key]
            t, sq, zeros = q.table, q.table_sq, [0.0] * len(q.allowed)
            out[key] = (zeros if t is None or t.grad is None else t.grad.tolist(),
                        zeros if sq is None else sq.tolist())
            if t is not None:
                t.grad = None
            if sq is not None:
                sq.zero_()
        return out

    # -- calibration -------------------------------------------------------------
    def act_inputs(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """The float tensor every activation quantizer sees for ``batch`` (flattened; calibration)."""
        seen: dict[str, list[torch.Tensor]] = {}
        hooks = []
        for key, q in self.tensor_quantizers().items():
            if q.kind == "act":
                hooks.append(q.register_forward_pre_hook(
                    lambda _m, args, key=key: seen.setdefault(key, []).append(args[0].detach())))
        try:
            trace.example_forward(self.gm, batch)
        finally:
            for h in hooks:
                h.remove()
        return {key: torch.cat([t.reshape(-1) for t in ts]) for key, ts in seen.items()}

    @torch.no_grad()
    def calibrate(self, batch: torch.Tensor) -> None:
        """MSE-initialise every width's step: weights from themselves, activations from ``batch``."""
        was_training = self.gm.training
        self.gm.eval()
        # Calibrate every activation on float inputs: every quantizer passes its input through.
        # (Moving the gates to 32 bits is not enough: a width set without 32, such as the network
        # input's, would quantize with the not yet calibrated steps.)
        bypass = [q.register_forward_hook(lambda _m, args, _out: args[0]) for q in self.all_quantizers()]
        try:
            inputs = self.act_inputs(batch)
        finally:
            for hook in bypass:
                hook.remove()
        for key, q in self.tensor_quantizers().items():
            if q.kind == "weight":
                q.calibrate(attr_tensor(self.gm, self.tensors[key].tensor))
            elif key in inputs:
                q.calibrate(inputs[key])
        self.gm.train(was_training)

    @torch.no_grad()
    def recalibrate(self, widths: dict[str, int], batch: torch.Tensor) -> None:
        """MSE-fit the step of width ``widths[key]`` of each named quantizer to the tensor as it is now:
        the current weights, or the inputs the quantized model (at its current widths) gives it for ``batch``."""
        was_training = self.gm.training
        self.gm.eval()
        qs = self.tensor_quantizers()
        acts = [k for k in widths if qs[k].kind == "act"]
        inputs = self.act_inputs(batch) if acts else {}
        for key, width in widths.items():
            q = qs[key]
            if q.kind == "weight":
                q.calibrate(attr_tensor(self.gm, self.tensors[key].tensor), widths=(width,))
            elif key in inputs:
                q.calibrate(inputs[key], widths=(width,))
        self.gm.train(was_training)


def prepare(
    model: nn.Module,
    sample_shape: Sequence[int],
    leaves: Iterable[str] = (),
    widths_for: WidthsFn = all_widths,
    input_bits: int = 8,
    signedness: str = "auto",
    per_channel: bool = True,
    integer_ops: Iterable[str] = (),
    reduce_range: bool = False,
    integer_width: int = 8,
    input_dtype: torch.dtype = torch.float32,
) -> QuantizedModel:
    """Trace, fold BN, insert quantizers and measure MACs for one example of ``sample_shape``."""
    leaves = list(leaves)
    gm = trace.trace(model.eval(), leaves, torch.zeros((2, *sample_shape), dtype=input_dtype))
    gm = passes.fold_aten_batchnorm(passes.fold_batchnorm(gm))  # BN modules, and aten BN of a .pt2
    gm = passes.functionalize(gm)
    example = torch.zeros((1, *sample_shape), dtype=input_dtype)
    _run_checked(lambda: ShapeProp(gm).propagate(example), example)
    spec = passes.QuantSpec(widths_for=widths_for, input_bits=input_bits, signedness=signedness,
                            per_channel=per_channel, integer_ops=frozenset(integer_ops), reduce_range=reduce_range,
                            integer_width=integer_width)
    layers, tensors = passes.insert_quantizers(gm, spec)
    _run_checked(lambda: trace.example_forward(gm, example), example)
    shapes = [cost.LayerShape(layer.name, layer.op, layer.macs, layer.params, layer.bias_params, *layer.cost_keys)
              for layer in layers]
    float_ops = coverage.float_compute(gm, example, {layer.node for layer in layers}, set(leaves))
    float_params = coverage.float_parameters(
        gm, {info.tensor for info in tensors.values() if info.kind == "weight"},
        {layer.bias for layer in layers if layer.bias})
    extras = cost.Extras(float_macs=sum(op.macs for op in float_ops), float_params=float_params)
    return QuantizedModel(gm=gm, layers=layers, shapes=shapes, sample_shape=tuple(sample_shape), tensors=tensors,
                          integer_ops=spec.integer_ops, sample_dtype=input_dtype, float_ops=float_ops, extras=extras)


def _run_checked(fn, example: torch.Tensor) -> None:
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # fx prints its own traceback on errors
            fn()
    except Exception as exc:  # any shape error inside the user's forward
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UsageError(f"the model does not accept inputs of shape {tuple(example.shape)}: {first}",
                         "check --input-shape (batch first) or the data set") from None
