"""The alternating CGMQ schedule: gate epochs, weight epochs, then final weight epochs.

    calibrate -> [gate epoch -> finish (repair, fill) -> weight epoch] x rounds -> weight epochs

Bits change only in gate epochs and their finish, so the cost after the last
finish is the final cost. Progress is reported as :class:`Event` objects to a
callback; the state after every epoch goes to a ``save`` callback so that an
interrupted run resumes from its last finished epoch.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from cgmq_cli import cgmq
from cgmq_cli.cost import Budget, MacCost
from cgmq_cli.distributed import DistContext
from cgmq_cli.errors import TrainingError
from cgmq_cli.outputs import logits
from cgmq_cli.qmodel import QuantizedModel


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 6
    lr: float = 1e-3
    eta: float = 0.05
    r: float = 1.5
    gate_steps: int = 300  # a gate epoch is one pass or at least this many batches
    probe_batches: int = 8
    finish: str = "repair-fill"  # or "constraint" (plain CGGD)
    max_bad_batches: int = 20
    device: str = "cpu"
    rounds: int | None = None  # (gate, weight) rounds; None: max(1, epochs // 3); 0: plain QAT

    def schedule(self) -> list[str]:
        """Epoch kinds: ``rounds`` of (gate, weight), then the remaining weight epochs."""
        rounds = self.rounds if self.rounds is not None else max(1, self.epochs // 3)
        kinds = ["gate", "weight"] * rounds
        return (kinds + ["weight"] * self.epochs)[: self.epochs]


@dataclass(frozen=True)
class Event:
    kind: str  # "epoch_start" | "progress" | "epoch_end" | "bad_batch" | "info"
    epoch: int
    data: dict = field(default_factory=dict)


@dataclass
class TrainState:
    """What a resumed run needs besides the model state."""

    epoch: int = 0  # epochs finished
    history: list[dict] = field(default_factory=list)
    optimizer: dict | None = None
    bad_batches: int = 0


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cycle(loader: Any) -> Iterator:
    while True:
        yield from loader


def evaluate(model: nn.Module, loader: Any, loss_fn: LossFn, device: str,
             dist: DistContext = DistContext()) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean loss over ``loader`` (summed over ranks when distributed)."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = logits(model(x))
            loss_sum += float(loss_fn(out, y)) * len(y)
            if out.ndim == 2:
                correct += int((out.argmax(1) == y).sum())
            total += len(y)
    correct, total, loss_sum = dist.sum(torch.tensor([correct, total, loss_sum], dtype=torch.float64)).tolist()
    return {"accuracy": 100.0 * correct / max(total, 1), "loss": loss_sum / max(total, 1)}


class Trainer:
    def __init__(self, qm: QuantizedModel, train_loader: Any, val_loader: Any, budget: Budget,
                 config: TrainConfig, mac_cost: MacCost | None = None,
                 loss_fn: LossFn | None = None, on_event: Callable[[Event], None] | None = None,
                 dist: DistContext = DistContext(), amp: bool = False) -> None:
        self.qm, self.train_loader, self.val_loader = qm, train_loader, val_loader
        self.dist = dist
        self.amp = amp and config.device.startswith("cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.net: nn.Module = qm.gm
        if dist.enabled:  # weight epochs run through DDP; steps of unused widths get no gradient
            from torch.nn.parallel import DistributedDataParallel

            ids = [torch.device(config.device).index] if config.device.startswith("cuda") else None
            self.net = DistributedDataParallel(qm.gm, device_ids=ids, find_unused_parameters=True)
        self.config = config
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.on_event = on_event or (lambda e: None)
        self.costs = cgmq.CostModel(qm.shapes, budget, mac_cost, qm.extras)
        self.tensors = cgmq.free_tensors(qm)
        self.optimizer = torch.optim.Adam(qm.weight_params(), lr=config.lr)
        self.state = TrainState()
        self._batches = _cycle(train_loader)
        self._bad_streak = 0

    # -- helpers ---------------------------------------------------------------
    def _emit(self, kind: str, epoch: int, /, **data: Any) -> None:
        self.on_event(Event(kind, epoch, data))

    def _forward_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dev = self.config.device
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            return self.loss_fn(logits(model(x.to(dev))), y.to(dev))

    def _loss(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor | None:
        """The batch loss, or None for a non-finite loss (skipped and counted; every rank agrees).

        ``max_bad_batches`` non-finite losses in a row abort the run with a
        TrainingError; the checkpoint of the last finished epoch stays as it was.
        """
        loss = self._forward_loss(model or self.qm.gm, x, y)
        if self.dist.all_true(bool(torch.isfinite(loss))):
            self._bad_streak = 0
            return loss
        self.state.bad_batches += 1
        self._bad_streak += 1
        self._emit("bad_batch", self.state.epoch, count=self.state.bad_batches)
        if self._bad_streak >= self.config.max_bad_batches:
            raise TrainingError(f"the loss was NaN/inf in {self._bad_streak} batches in a row; stopping",
                                "lower --lr or check the data and loss; the checkpoint of the last finished epoch is kept")
        return None

    def _gate_grads(self) -> torch.Tensor:
        """(doubling, halving) first-order loss changes of every free tensor, averaged over ranks."""
        values = torch.tensor([[float(t.quantizer.gate.grad or 0.0), float(t.quantizer.down_probe.grad or 0.0)]
                               for t in self.tensors], dtype=torch.float64).reshape(-1, 2)
        for t in self.tensors:
            t.quantizer.gate.grad = t.quantizer.down_probe.grad = None
        return self.dist.mean(values)

    def probe(self) -> cgmq.Probe:
        """Average first-order loss change of doubling / halving each free tensor over a few batches."""
        total = torch.zeros((len(self.tensors), 2), dtype=torch.float64)
        self.qm.set_probing(True)
        self.qm.gm.eval()
        for x, y in itertools.islice(self._batches, self.config.probe_batches):
            loss = self._loss(x, y)
            if loss is None:
                continue
            loss.backward()
            total += self._gate_grads()
        self.qm.set_probing(False)
        total /= max(self.config.probe_batches, 1)
        return {t.quantizer: (float(total[i, 0]), float(total[i, 1])) for i, t in enumerate(self.tensors)}

    # -- epochs ----------------------------------------------------------------
    def gate_epoch(self, epoch: int) -> dict:
        """Move the gates by the rule for one pass (at least ``gate_steps`` batches), then finish."""
        cfg = self.config
        steps = max(len(self.train_loader), cfg.gate_steps)
        self.qm.set_probing(True)
        self.qm.gm.eval()
        loads, crossings, was_over = [], 0, None
        for i, (x, y) in enumerate(itertools.islice(self._batches, steps)):
            loss = self._loss(x, y)
            if loss is None:
                continue
            loss.backward()
            grads = self._gate_grads()  # averaged over ranks: every rank takes the same step
            cgmq.gate_step(self.tensors, self.costs, self.qm.widths(), cfg.eta, cfg.r, grads[:, 0].tolist())
            load = self.costs.load(self.qm.widths())
            over = load > 1.0
            crossings += int(was_over is not None and over != was_over)
            was_over = over
            loads.append(load)
            if i % max(steps // 10, 1) == 0 or i == steps - 1:
                self._emit("progress", epoch, phase="gate", step=i + 1, steps=steps, loss=loss.item(),
                           load=load, rel_bops=self.costs.summary(self.qm.widths()).rel_bops)
        self.qm.set_probing(False)
        before = self.qm.widths()
        if cfg.finish == "constraint":
            after, repaired, filled = cgmq.constraint_repair(self.tensors, self.costs, self.qm.widths, cfg.eta), [], []
        else:
            after, repaired = cgmq.repair(self.tensors, self.costs, before, self.probe)
            after, filled = cgmq.fill(self.tensors, self.costs, after, self.probe)
        self.dist.check_same(list(self.qm.widths().values()), "the widths after a gate epoch")
        return {"load_before_finish": self.costs.load(before), "load_after_finish": self.costs.load(after),
                "min_load": min(loads, default=math.nan), "max_load": max(loads, default=math.nan),
                "crossings": crossings, "repaired": [asdict(m) for m in repaired], "filled": [asdict(m) for m in filled]}

    def weight_epoch(self, epoch: int) -> dict:
        """Train weights and steps with every width frozen."""
        self.qm.set_probing(False)
        self.qm.gm.train()
        total, n = 0.0, 0
        steps = len(self.train_loader)
        for i, (x, y) in enumerate(self.train_loader):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._loss(x, y, self.net)
            if loss is None:
                continue
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total, n = total + loss.item(), n + 1
            if i % max(steps // 5, 1) == 0 or i == steps - 1:
                self._emit("progress", epoch, phase="weight", step=i + 1, steps=steps, loss=loss.item())
        return {"train_loss": total / max(n, 1)}

    def run(self, save: Callable[[TrainState], None] | None = None) -> TrainState:
        """Run the remaining epochs of the schedule; ``save`` is called after each one."""
        schedule = self.config.schedule()
        for epoch in range(self.state.epoch, len(schedule)):
            kind = schedule[epoch]
            if hasattr(self.train_loader, "sampler") and hasattr(self.train_loader.sampler, "set_epoch"):
                self.train_loader.sampler.set_epoch(epoch)
            self._batches = _cycle(self.train_loader)  # every epoch starts its own pass of the sampler
            self._emit("epoch_start", epoch, epoch_kind=kind, epochs=len(schedule))
            info = self.gate_epoch(epoch) if kind == "gate" else self.weight_epoch(epoch)
            metrics = evaluate(self.qm.gm, self.val_loader, self.loss_fn, self.config.device, self.dist)
            summary = self.costs.summary(self.qm.widths())
            record = {"epoch": epoch + 1, "epoch_kind": kind, **info, **metrics, "rel_bops": summary.rel_bops,
                      "bops": summary.bops, "weight_bytes": summary.weight_bytes,
                      "within_budget": self.costs.budget.is_satisfied_by(summary)}
            self.state.history.append(record)
            self.state.epoch = epoch + 1
            self.state.optimizer = self.optimizer.state_dict()
            self._emit("epoch_end", epoch, **record)
            if save is not None:
                save(self.state)
        return self.state


def train_float(model: nn.Module, loader: Any, epochs: int, lr: float, seed: int, device: str = "cpu") -> nn.Module:
    """Plain float training with Adam and cross-entropy (the demo's starting checkpoint)."""
    torch.manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            optimizer.step()
    return model.eval()
