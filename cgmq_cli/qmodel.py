"""The prepared model: a traced GraphModule with gated quantizers, plus its layer table.

    prepare(model) = trace -> fold BatchNorm -> insert quantizers -> MACs by shape propagation

The same recipe rebuilds a saved run: trace the architecture again, prepare it
with the same settings, then load the saved state (folded weights, steps,
gates).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import fx, nn

from cgmq_cli import cost
from cgmq_cli.errors import UsageError
from cgmq_cli.graph import passes, trace
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

    def quantizers(self) -> dict[str, tuple[GatedQuantizer, GatedQuantizer]]:
        """Layer name -> (weight quantizer, activation quantizer)."""
        pairs = passes.quantizers(self.gm)
        return {layer.name: pairs[layer.key] for layer in self.layers}

    def all_quantizers(self) -> list[GatedQuantizer]:
        return [q for pair in self.quantizers().values() for q in pair]

    def bits(self) -> dict[str, tuple[int, int]]:
        return {name: (w.bits, a.bits) for name, (w, a) in self.quantizers().items()}

    def set_bits(self, bits: dict[str, tuple[int, int]]) -> None:
        for name, (w, a) in self.quantizers().items():
            w.set_bits(bits[name][0])
            a.set_bits(bits[name][1])

    def allowed(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        return {name: (w.allowed, a.allowed) for name, (w, a) in self.quantizers().items()}

    def cost(self, mac_cost: cost.MacCost | None = None) -> cost.CostSummary:
        """Exact cost of the current integer widths."""
        return cost.summarize(self.shapes, self.bits(), mac_cost)

    def weight_params(self) -> list[nn.Parameter]:
        """Everything a weight epoch trains: the model's parameters and the steps, not the gates."""
        gates = {id(q.gate) for q in self.all_quantizers()} | {id(q.down_probe) for q in self.all_quantizers()}
        return [p for p in self.gm.parameters() if id(p) not in gates]

    def set_probing(self, on: bool) -> None:
        """Gate-epoch mode: gates and probes take gradients, weights and steps are frozen (and back)."""
        for p in self.weight_params():
            p.requires_grad_(not on)
        for q in self.all_quantizers():
            q.probing = on
            q.gate.requires_grad_(on)
            q.down_probe.requires_grad_(on)

    def layer_inputs(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """The input activation of every layer for ``batch`` (calibration)."""
        seen: dict[str, list[torch.Tensor]] = {}
        hooks = []
        for name, (_, act) in self.quantizers().items():
            hooks.append(act.register_forward_pre_hook(
                lambda _m, args, name=name: seen.setdefault(name, []).append(args[0].detach())))
        try:
            trace.example_forward(self.gm, batch)
        finally:
            for h in hooks:
                h.remove()
        return {name: torch.cat([t.reshape(-1) for t in ts]) for name, ts in seen.items()}

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
            inputs = self.layer_inputs(batch)
        finally:
            for hook in bypass:
                hook.remove()
        weights = {layer.name: self.gm.get_parameter(self._weight_target(layer)) for layer in self.layers}
        for name, (wq, aq) in self.quantizers().items():
            wq.calibrate(weights[name])
            aq.calibrate(inputs[name])
        self.gm.train(was_training)

    def _weight_target(self, layer: passes.LayerInfo) -> str:
        node = next(n for n in self.gm.graph.nodes if n.name == layer.calls[0])
        return node.args[1].args[0].target


def prepare(
    model: nn.Module,
    sample_shape: Sequence[int],
    leaves: Iterable[str] = (),
    widths_for: WidthsFn = all_widths,
    input_bits: int = 8,
    signedness: str = "auto",
    per_channel: bool = True,
) -> QuantizedModel:
    """Trace, fold BN, insert quantizers and measure MACs for one example of ``sample_shape``."""
    gm = trace.trace(model.eval(), leaves)
    gm = passes.fold_batchnorm(gm)
    gm, layers = passes.insert_quantizers(gm, widths_for, input_bits, signedness, per_channel)
    example = torch.zeros((1, *sample_shape))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # fx prints its own traceback on errors
            trace.example_forward(gm, example)
    except Exception as exc:  # any shape error inside the user's forward
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UsageError(f"the model does not accept inputs of shape {tuple(example.shape)}: {first}",
                         "check --input-shape (batch first) or the data set") from None
    macs = cost.layer_macs(gm, {layer.name: layer.calls for layer in layers}, example)
    shapes = [cost.LayerShape(layer.name, layer.op, macs[layer.name], layer.params, layer.bias_params) for layer in layers]
    return QuantizedModel(gm=gm, layers=layers, shapes=shapes, sample_shape=tuple(sample_shape))
