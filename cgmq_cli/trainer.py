"""The alternating CGMQ schedule: gate epochs, weight epochs, then final weight epochs.

    calibrate -> [gate epoch -> finish (repair, fill) -> weight epoch] x rounds -> weight epochs

Bits change only in gate epochs and their finish, so the cost after the last
finish is the final cost. Progress is reported as :class:`Event` objects to a
callback; the state after every epoch goes to a ``save`` callback so that an
interrupted run resumes from its last finished epoch.

The fine-tuning recipe (README, "The recipe"): Adam at ``lr`` decayed by a
cosine over every weight-training step of the run (``lr_schedule``); with
``gate_weights`` the weights also train at the current widths during gate
epochs; with ``gate_share`` < 1 a gate epoch gives only that share of its pass
to gate steps and trains the weights at the finished widths for the rest; with
``recalibrate`` a width that the finish switches a tensor to gets its step
fitted to the tensor as it is now, and that step's Adam state is reset.
With ``distill`` > 0 the weights also learn the float model's output distribution
(``distill * KL(p_float || p_quantized)`` added to the loss of every weight-training step).
Gate and probe passes always run in float32 (no autocast), so ``--amp`` never
feeds fp16 gradients to the gates without a GradScaler.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from cgmq_cli import cgmq, explain, finish, probes
from cgmq_cli.cost import Budget, MacCost
from cgmq_cli.distributed import DistContext
from cgmq_cli.errors import TrainingError
from cgmq_cli.outputs import logits
from cgmq_cli.qmodel import QuantizedModel
from cgmq_cli.schedule import TrainConfig  # noqa: F401  (re-exported: callers import it from here)


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
    trained_widths: dict | None = None  # the widths of the last weight-training step (for re-calibration)


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
                 dist: DistContext = DistContext(), amp: bool = False, seed: int = 0,
                 teacher: nn.Module | None = None, train_loss_fn: LossFn | None = None) -> None:
        self.qm, self.train_loader, self.val_loader = qm, train_loader, val_loader
        # the float model: weight training also matches its outputs (distill > 0); frozen, never saved
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None and config.distill > 0 else None
        self.dist = dist
        self.seed = seed
        self.amp = amp and config.device.startswith("cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.net: nn.Module = qm.gm
        if dist.enabled:  # weight epochs run through DDP; steps of unused widths get no gradient
            from torch.nn.parallel import DistributedDataParallel

            ids = [torch.device(config.device).index] if config.device.startswith("cuda") else None
            self.net = DistributedDataParallel(qm.gm, device_ids=ids, find_unused_parameters=True)
        self.config = config
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        # what weight training minimises (e.g. cross-entropy with label smoothing); gates, probes and scores use loss_fn
        self.train_loss_fn = train_loss_fn or self.loss_fn
        self.on_event = on_event or (lambda e: None)
        self.costs = cgmq.CostModel(qm.shapes, budget, mac_cost, qm.extras)
        self.tensors = cgmq.free_tensors(qm)
        self.optimizer = torch.optim.Adam(qm.weight_params(), lr=config.lr)
        self.state = TrainState()
        self._batches = _cycle(train_loader)
        self._bad_streak = 0
        self._finite_losses = 0  # batches whose loss was finite (gate steps and weight steps)

    # -- helpers ---------------------------------------------------------------
    def _emit(self, kind: str, epoch: int, /, **data: Any) -> None:
        self.on_event(Event(kind, epoch, data))

    def _forward_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool,
                      training: bool = False) -> torch.Tensor:
        """The task loss; with ``training`` (weight training) the training loss instead, plus
        ``config.distill`` times the KL divergence from the float teacher's output distribution
        (over dim 1) to the model's."""
        dev = self.config.device
        x = x.to(dev)
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            out = logits(model(x))
            loss = (self.train_loss_fn if training else self.loss_fn)(out, y.to(dev))
            if training and self.teacher is not None:
                with torch.no_grad():
                    target = logits(self.teacher(x))
                loss = loss + self.config.distill * kl_to_teacher(out, target)
        return loss

    def _loss(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module | None = None,
              amp: bool = False, training: bool = False) -> torch.Tensor | None:
        """The batch loss, or None for a non-finite loss (skipped and counted; every rank agrees).

        ``amp`` (fp16 autocast) only for weight epochs, whose backward goes through the GradScaler.
        ``max_bad_batches`` non-finite losses in a row abort the run with a
        TrainingError; the checkpoint of the last finished epoch stays as it was.
        """
        loss = self._forward_loss(model or self.qm.gm, x, y, amp and self.amp, training)
        if self.dist.all_true(bool(torch.isfinite(loss))):
            self._bad_streak = 0
            self._finite_losses += 1
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

    def _set_lr(self, epoch: int, step: int) -> None:
        lr = self.config.lr_at(len(self.train_loader), epoch, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def probe_set(self, epoch: int) -> list[probes.Batch]:
        """The fixed probe set of the finish after gate epoch ``epoch`` (seeded by the run's seed and epoch)."""
        return probes.probe_set(self.train_loader, self.config.probe_batches, self.seed, epoch,
                                self.dist.world, self.dist.rank)

    def predict(self, batches: list[probes.Batch], tensors: list[cgmq.Tensor] | None = None) -> tuple[probes.Table, int]:
        """The finish's predicted table at the model's widths (:func:`cgmq_cli.probes.predict`)."""
        return probes.predict(self.qm, self.tensors if tensors is None else tensors, batches, self._loss, self.dist)

    def probe_loss(self, batches: list[probes.Batch], widths: cgmq.Widths) -> float:
        """The mean loss over the finite-loss batches of ``batches`` at ``widths`` (over every rank's); the
        model's widths are left at ``widths``. No finite batch: +inf (so no move is ever measured as a gain)."""
        return probes.probe_loss(self.qm, batches, widths, self._probe_forward, self.dist)[0]

    def measure(self, batches: list[probes.Batch], widths: cgmq.Widths,
                tensors: list[cgmq.Tensor] | None = None) -> tuple[probes.Table | None, int]:
        """The finish's measured table at ``widths`` (:func:`cgmq_cli.probes.measure`)."""
        return probes.measure(self.qm, self.tensors if tensors is None else tensors, batches, widths,
                              self._probe_forward, self.dist)

    def _probe_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._forward_loss(self.qm.gm, x, y, False)

    # -- epochs ----------------------------------------------------------------
    def gate_epoch(self, epoch: int) -> dict:
        """Move the gates by the rule for one pass (at least ``gate_steps`` batches), then finish."""
        cfg = self.config
        joint = cfg.gate_weights
        steps = cfg.gate_length(len(self.train_loader), epoch)
        self.qm.set_probing(True, train_weights=joint)
        self.qm.gm.train(joint)
        loads, crossings, was_over = [], 0, None
        try:
            for i, (x, y) in enumerate(itertools.islice(self._batches, steps)):
                if joint:
                    self.optimizer.zero_grad(set_to_none=True)
                loss = self._loss(x, y, self.net if joint else self.qm.gm)
                if loss is None:
                    continue
                loss.backward()
                grads = self._gate_grads()  # averaged over ranks: every rank takes the same step
                if joint:
                    self._set_lr(epoch, i)
                    self.optimizer.step()
                eta = cfg.eta * (1.0 - i / steps) if cfg.gate_eta_decay else cfg.eta
                cgmq.gate_step(self.tensors, self.costs, self.qm.widths(), eta, cfg.r, grads[:, 0].tolist())
                load = self.costs.load(self.qm.widths())
                over = load > 1.0
                crossings += int(was_over is not None and over != was_over)
                was_over = over
                loads.append(load)
                if i % max(steps // 10, 1) == 0 or i == steps - 1:
                    self._emit("progress", epoch, phase="gate", step=i + 1, steps=steps, loss=loss.item(),
                               load=load, rel_bops=self.costs.summary(self.qm.widths()).rel_bops)
        finally:
            self.qm.set_probing(False)
        if joint:
            self.state.trained_widths = self.qm.widths()
        out = {"min_load": min(loads, default=math.nan), "max_load": max(loads, default=math.nan),
               "crossings": crossings, **self.finish(epoch)}
        tail = cfg.gate_tail(len(self.train_loader))
        if tail:  # the rest of the pass trains the weights at the finished widths
            trained = self._train_weights(epoch, itertools.islice(self._batches, tail), tail,
                                          steps if joint else 0)
            out.update({f"tail_{k}": v for k, v in trained.items()}, tail_steps=tail)
        return out

    def finish(self, epoch: int) -> dict:
        """Make the widths feasible (and use the budget) on one fixed probe set; see :mod:`cgmq_cli.finish`."""
        cfg = self.config
        started = time.perf_counter()
        batches = self.probe_set(epoch)
        before = self.qm.widths()
        widths, repaired, filled, undone, note, used, table = before, [], [], [], None, 0, "predicted"
        if cfg.finish == "constraint":
            widths, note = finish.constraint_repair(self.tensors, self.costs, self.qm.widths, cfg.eta)
            if note:
                self._emit("info", epoch, message=note)
                pred, used = self.predict(batches)
                widths, repaired = finish.repair(self.tensors, self.costs, widths, pred)
        else:
            pred, used, table = self._finish_table(batches, before, self._measures(batches))
            widths, repaired = finish.repair(self.tensors, self.costs, before, pred)
            repaired_widths = widths
            widths, filled = finish.fill(self.tensors, self.costs, widths, pred)
            if filled:  # confirm the plan once, at the planned widths: the filled tensors' moves back
                raised = {m.tensor for m in filled}
                pred = self._finish_table(batches, widths, table == "measured",
                                          [t for t in self.tensors if t.key in raised])[0]
                widths, undone = finish.confirm(self.tensors, widths, repaired_widths, pred)
            if cfg.measured_fill:
                widths, spent = finish.spend(self.tensors, self.costs, widths, lambda w: self.probe_loss(batches, w),
                                             self.probe_loss(batches, widths))
                filled = filled + spent
            if cfg.measured_exchange:
                widths, swapped = finish.exchange(self.tensors, self.costs, widths,
                                                  lambda w: self.probe_loss(batches, w), self.probe_loss(batches, widths))
                filled = filled + swapped
        self.qm.set_widths(widths)
        self.dist.check_same(list(self.qm.widths().values()), "the widths after a gate epoch")
        if cfg.recalibrate:
            self._recalibrate(batches)
        out = {"load_before_finish": self.costs.load(before), "load_after_finish": self.costs.load(widths),
               "repaired": [asdict(m) for m in repaired], "filled": [asdict(m) for m in filled],
               "undone": [asdict(m) for m in undone], "probe_batches_used": used,
               "finish_table": table,
               "finish_seconds": time.perf_counter() - started}
        return {**out, "finish_note": note} if note else out

    def _measures(self, batches: list[probes.Batch]) -> bool:
        """Whether this run's finishes measure their table (``finish_table``; "auto": where it is cheap)."""
        cfg = self.config
        if cfg.finish_table != "auto":
            return cfg.finish_table == "measured"
        moves = sum(len(t.quantizer.allowed) - 1 for t in self.tensors)
        macs_per_batch = (len(batches[0][0]) if batches else 0) * (self.costs.ctx.macs + self.costs.ctx.float_macs)
        return cfg.measuring_fits(moves, len(batches), len(self.train_loader), macs_per_batch)

    def _finish_table(self, batches: list[probes.Batch], widths: cgmq.Widths, measured: bool,
                      tensors: list[cgmq.Tensor] | None = None) -> tuple[finish.Predictions, int, str]:
        """The finish's table at ``widths`` (the model is left there), the probe batches it used, and its kind:
        measured when asked (and some probe batch had a finite loss), else predicted."""
        self.qm.set_widths(widths)
        if measured:
            table, used = self.measure(batches, widths, tensors)
            if table is not None:
                return table, used, "measured"
        return (*self.predict(batches, tensors), "predicted")

    def _recalibrate(self, batches: list[probes.Batch]) -> None:
        """Fit the step of every width that no weight-training step has used since it became active
        to the tensor as it is now, and drop that step's Adam state."""
        trained = self.state.trained_widths or {}
        stale = {t.key: t.quantizer.bits for t in self.tensors
                 if t.quantizer.bits != trained.get(t.key) and str(t.quantizer.bits) in t.quantizer.steps}
        if not stale or not batches:
            return
        self.qm.recalibrate(stale, probes.calibration_inputs(batches).to(self.config.device))
        qs = self.qm.tensor_quantizers()
        for key, width in stale.items():
            for params in (qs[key].steps, qs[key].zero_points):
                if str(width) in params:
                    self.optimizer.state.pop(params[str(width)], None)

    def weight_epoch(self, epoch: int) -> dict:
        """Train weights and steps with every width frozen."""
        return self._train_weights(epoch, self.train_loader, len(self.train_loader))

    def _train_weights(self, epoch: int, batches: Any, steps: int, done: int = 0) -> dict:
        """Train weights and steps with every width frozen on ``batches`` (``steps`` of them), the first at
        step ``done`` of the epoch's learning-rate clock."""
        self.qm.set_probing(False)
        self.qm.gm.train()
        total, n = 0.0, 0
        for i, (x, y) in enumerate(batches):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._loss(x, y, self.net, amp=True, training=True)
            if loss is None:
                continue
            self._set_lr(epoch, done + i)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total, n = total + loss.item(), n + 1
            if i % max(steps // 5, 1) == 0 or i == steps - 1:
                self._emit("progress", epoch, phase="weight", step=i + 1, steps=steps, loss=loss.item())
        self.state.trained_widths = self.qm.widths()
        return {"train_loss": total / max(n, 1), "lr_end": self.optimizer.param_groups[0]["lr"]}

    def run(self, save: Callable[[TrainState], None] | None = None) -> TrainState:
        """Run the remaining epochs of the schedule; ``save`` is called after each one."""
        schedule = self.config.schedule()
        for epoch in range(self.state.epoch, len(schedule)):
            kind = schedule[epoch]
            for part in (getattr(self.train_loader, "sampler", None), getattr(self.train_loader, "dataset", None)):
                if hasattr(part, "set_epoch"):  # the shuffle, and the augmentation (cgmq_cli.augment), of this epoch
                    part.set_epoch(epoch)
            self._batches = _cycle(self.train_loader)  # every epoch starts its own pass of the sampler
            self._emit("epoch_start", epoch, epoch_kind=kind, epochs=len(schedule))
            trained = self._finite_losses
            info = self.gate_epoch(epoch) if kind == "gate" else self.weight_epoch(epoch)
            if self._finite_losses == trained:  # fewer batches than max_bad_batches, every one skipped
                raise TrainingError(f"every batch's loss in epoch {epoch + 1} was NaN/inf; nothing was trained",
                                    "check the data and the loss; the checkpoint of the last finished epoch is kept")
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

    def explain(self) -> list[dict]:
        """report.json's ``tensors``: per quantizer, the predicted loss change and the cost of one step
        up or down, from one probe of a fixed probe set at the final widths (see :mod:`cgmq_cli.explain`)."""
        pred, _ = self.predict(self.probe_set(len(self.config.schedule())))
        return explain.tensor_entries(self.qm, self.costs, pred)


def kl_to_teacher(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(out)) over dim 1, averaged over every other position (in float32)."""
    if out.ndim < 2 or out.shape != target.shape:
        raise TrainingError(f"distillation needs outputs of the same shape with a class dimension; got {tuple(out.shape)} "
                            f"and the float model's {tuple(target.shape)}", "set distill: 0 in cgmq.yaml")
    log_p = torch.log_softmax(target.float(), dim=1)
    log_q = torch.log_softmax(out.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


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
