"""The methods cgmq is compared with, built on the same quantizers and trainer.

* uniform QAT: the widest single (b_w, b_a) pair that fits the budget, then QAT;
* sensitivity-guided mixed precision fixed before QAT (AIMET AMP / HAWQ-style):
  measure each tensor's loss increase at every lower width, lower widths
  greedily by cost saved per loss added until the budget holds, then QAT;
* penalty method (Bayesian Bits / DQ style): task loss + mu * relative BOPs,
  gates trained by gradient with no constraint handling; mu is searched until
  a run lands under the budget, and the number of runs is recorded;
* onnxruntime's post-training static int8 quantization of the float model.
"""

from __future__ import annotations

import itertools
import torch
from torch import nn

from cgmq_cli import cgmq
from cgmq_cli.cost import Budget
from cgmq_cli.qmodel import QuantizedModel
from cgmq_cli.trainer import Trainer

WIDTHS = (2, 4, 8, 16)


def uniform_widths(qm: QuantizedModel, bw: int, ba: int) -> dict[str, int]:
    """Every weight at ``bw`` and every activation at ``ba`` (a tensor of one allowed width keeps it)."""
    qs = qm.tensor_quantizers()
    return {key: q.allowed[0] if len(q.allowed) == 1 else (bw if q.kind == "weight" else ba) for key, q in qs.items()}


def uniform_bits(qm: QuantizedModel, budget: Budget) -> dict[str, int] | None:
    """The widest uniform (b_w, b_a) assignment within budget (network input stays at its fixed width)."""
    best = None
    for bw, ba in itertools.product(WIDTHS, WIDTHS):
        bits = uniform_widths(qm, bw, ba)
        qm.set_widths(bits)
        if budget.is_satisfied_by(qm.cost()):
            key = (bw * ba, -abs(bw - ba), bw)
            if best is None or key > best[0]:
                best = (key, bits)
    return None if best is None else best[1]


def _loss_on(qm: QuantizedModel, batches: list) -> float:
    with torch.no_grad():
        return sum(float(nn.functional.cross_entropy(qm.gm(x), y)) for x, y in batches) / len(batches)


def sensitivity_bits(qm: QuantizedModel, budget: Budget, batches: list) -> dict[str, int]:
    """Greedy lowering from all-16-bit by (loss added) / (cost saved), per-tensor sensitivities measured once."""
    qm.gm.eval()
    qm.set_widths(uniform_widths(qm, 16, 16))
    base = _loss_on(qm, batches)
    tensors = cgmq.free_tensors(qm)
    delta: dict[tuple[int, int], float] = {}
    for i, t in enumerate(tensors):
        for b in WIDTHS:
            if b in t.quantizer.allowed and b <= 16:
                t.quantizer.set_bits(b)
                delta[(i, b)] = _loss_on(qm, batches) - base
        t.quantizer.set_bits(16)
    costs = cgmq.CostModel(qm.shapes, budget, None)
    bits = qm.widths()
    while costs.violated(bits):
        best = None
        for i, t in enumerate(tensors):
            cur = t.quantizer.bits
            lower = [b for b in WIDTHS if b < cur and b in t.quantizer.allowed]
            if not lower:
                continue
            nxt = max(lower)
            after = cgmq._moved(bits, t, nxt)
            score = (delta[(i, nxt)] - delta[(i, cur)]) / costs.share(bits, after)
            if best is None or score < best[0]:
                best = (score, t, nxt, after)
        _, t, nxt, bits = best
        t.quantizer.set_bits(nxt)
    return bits


class PenaltyTrainer(Trainer):
    """Gate epochs minimise L + mu * BOPs / BOPs_fp32 with Adam on the gates; no repair, no guarantee."""

    mu: float = 1.0
    gate_lr: float = 0.05

    def gate_epoch(self, epoch: int) -> dict:
        steps = max(len(self.train_loader), self.config.gate_steps)
        gates = [t.quantizer.gate for t in self.tensors]
        if not hasattr(self, "_gate_opt"):
            self._gate_opt = torch.optim.Adam(gates, lr=self.gate_lr)
        self.qm.set_probing(True)
        self.qm.gm.eval()
        fp32 = self.qm.cost().bops_fp32
        for x, y in itertools.islice(self._batches, steps):
            loss = self._loss(x, y)
            if loss is None:
                continue
            loss.backward()
            grad_cost = self.costs.gradient("bops", self.tensors, self.qm.widths()) / fp32
            for t, dc in zip(self.tensors, grad_cost.tolist()):
                t.quantizer.gate.grad = t.quantizer.gate.grad + self.mu * dc
            self._gate_opt.step()
            for t in self.tensors:
                t.quantizer.clamp_gate()
                t.quantizer.gate.grad = t.quantizer.down_probe.grad = None
        self.qm.set_probing(False)
        return {"mu": self.mu}


def onnxruntime_int8(float_onnx: str, out_path: str, calibration: list[torch.Tensor]) -> None:
    """onnxruntime.quantization.quantize_static: QDQ, per-channel int8 weights, uint8 activations."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    name = onnx.load(float_onnx).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{name: x.numpy()} for x in calibration])

        def get_next(self):  # noqa: ANN201
            return next(self.it, None)

    quantize_static(float_onnx, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
