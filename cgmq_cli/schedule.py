"""The fine-tuning recipe's settings and its schedule: which epoch is a gate epoch, how long it is,
and the learning rate of every weight-training step.

    kinds = ["gate", "weight"] * rounds + ["weight"] * (epochs - 2 * rounds)
    lr(step) = lr * (1 + cos(pi * done / total)) / 2        (lr_schedule "cosine")

``done`` counts the weight-training steps before ``step`` over the whole run, ``total`` all of them
(a gate epoch counts its gate steps only with ``gate_weights``, and the weight training after its finish
when ``gate_share`` < 1). Measured choices: benchmarks/results/recipe.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# "auto" measures the finish's table when its forward passes are at most this share of the run's training
# passes, or when they come to at most MEASURE_FLOOR_MACS multiply-accumulates in all (a model so small, or a
# run so short, that a few seconds of measuring are a large share of it: about 10 s on one CPU core here)
MEASURE_SHARE = 0.05
MEASURE_FLOOR_MACS = 2e11
PASSES_PER_STEP = 3  # a training step (forward and backward) costs about three forward passes


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 6
    lr: float = 1e-3  # peak; measured against 3e-4 and 1e-4 on three tasks (benchmarks/results/recipe.md)
    eta: float = 0.05
    r: float = 1.5
    gate_steps: int = 300  # a gate epoch is one pass or at least this many batches
    probe_batches: int = 8  # the fixed probe set of each finish
    finish: str = "repair-fill"  # or "constraint" (plain CGGD)
    max_bad_batches: int = 20
    device: str = "cpu"
    rounds: int | None = None  # (gate, weight) rounds; None: max(1, epochs // epochs_per_round); 0: plain QAT
    epochs_per_round: int = 6  # one gate epoch per this many epochs (3 before: a second gate epoch cost accuracy)
    lr_schedule: str = "cosine"  # over every weight-training step of the run; or "constant"
    gate_weights: bool = False  # weights train at the current widths during gate epochs too
    recalibrate: bool = False  # a width the finish switches to gets a fresh MSE step and Adam state
    gate_eta_decay: bool = False  # eta falls linearly to 0 over each gate epoch
    last_gate_fraction: float = 1.0  # the last gate epoch's length as a fraction of the others'
    measured_fill: bool = False  # spend budget the fill left on raises that lower the measured probe-set loss
    measured_exchange: bool = False  # then lower one width to raise another while the measured probe-set loss falls
    distill: float = 0.0  # weight of the KL term to the float model's outputs in weight training (0: off)
    label_smoothing: float = 0.0  # weight training's cross-entropy spreads this much target mass evenly (built-in loss only)
    finish_table: str = "auto"  # the finish's loss changes: "measured", "predicted", or "auto" (measured where it fits)
    gate_share: float = 1.0  # a gate epoch's share of gate steps; the rest of its pass trains weights at the finished widths

    def schedule(self) -> list[str]:
        """Epoch kinds: ``rounds`` of (gate, weight), then the remaining weight epochs."""
        rounds = self.rounds if self.rounds is not None else max(1, self.epochs // self.epochs_per_round)
        kinds = ["gate", "weight"] * rounds
        return (kinds + ["weight"] * self.epochs)[: self.epochs]

    def gate_length(self, batches: int, epoch: int) -> int:
        """Gate steps of the gate epoch ``epoch``: ``gate_share`` of one pass or of ``gate_steps`` batches,
        whichever is more (the last gate epoch scaled by ``last_gate_fraction``)."""
        steps = max(batches, self.gate_steps) * self.gate_share
        kinds = self.schedule()
        last = max((i for i, k in enumerate(kinds) if k == "gate"), default=-1)
        return max(1, math.ceil(steps * (self.last_gate_fraction if epoch == last else 1.0)))

    def gate_tail(self, batches: int) -> int:
        """Weight-training steps at the end of every gate epoch, after its finish: the rest of the pass."""
        return round(batches * (1.0 - self.gate_share))

    def train_steps(self, batches: int) -> list[int]:
        """Weight-training steps per epoch (the lr schedule's clock)."""
        return [batches if k == "weight"
                else (self.gate_length(batches, i) if self.gate_weights else 0) + self.gate_tail(batches)
                for i, k in enumerate(self.schedule())]

    def measuring_fits(self, moves: int, probe_batches: int, batches: int, macs_per_batch: float = math.inf) -> bool:
        """Whether measuring ``moves`` single moves on ``probe_batches`` batches in every gate epoch's finish
        costs at most :data:`MEASURE_SHARE` of the run's training passes (``batches`` per epoch), or at most
        :data:`MEASURE_FLOOR_MACS` in all (``macs_per_batch``: one forward pass of a batch)."""
        kinds = self.schedule()
        steps = sum(self.gate_length(batches, i) + self.gate_tail(batches) if k == "gate" else batches
                    for i, k in enumerate(kinds))
        passes = kinds.count("gate") * moves * probe_batches
        return passes <= MEASURE_SHARE * PASSES_PER_STEP * steps or passes * macs_per_batch <= MEASURE_FLOOR_MACS

    def lr_at(self, batches: int, epoch: int, step: int) -> float:
        """The learning rate of weight-training step ``step`` of epoch ``epoch``."""
        if self.lr_schedule == "constant":
            return self.lr
        steps = self.train_steps(batches)
        done, total = sum(steps[:epoch]) + step, max(sum(steps), 1)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(done / total, 1.0)))
