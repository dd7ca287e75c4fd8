"""The discrete finish of a gate epoch: widths that hold every budget, planned on one set of predictions.

The gate epoch often ends over the budget (the gates oscillate across it).
The finish turns its widths into a feasible assignment in a bounded number of
moves, from one table of loss changes taken on a fixed probe set::

    pred[t][w] = loss change of moving tensor t alone from its width b to width w

measured (the probe-set loss at each single move, one forward pass each: the
trainer does this where it costs at most 5 % of the run's training passes or
little in all, ``finish_table: auto``, see :meth:`TrainConfig.measuring_fits
<cgmq_cli.schedule.TrainConfig.measuring_fits>`) or predicted to second order
from one probe pass::

    pred[t][w] = <g, e> + B/2 * sum((g * e)^2),   g = dL/dQ_t,  e = Q_t,w(x) - Q_t,b(x)

(the diagonal empirical Fisher in place of the Hessian). The first-order term
alone is mostly noise near a minimum: after a gate epoch on LeNet-5 it
predicted that 2-bit weights would *lower* the loss, so repair took them first
(rank correlation with the measured changes 0.39; second order 0.64).
The table is read as additive over tensors, so a plan of several moves is
scored without probing again:

* :func:`repair`: while a budget is violated, lower the tensor (to any lower
  width) with the smallest predicted loss increase per unit of cost saved in
  the *violated* budgets. A move that saves nothing there is never scored
  (a halving into a tied cost-table entry is looked past, to the next width
  that saves); only when no single move saves anything is a width lowered
  without saving (the one predicted cheapest, to its minimum), on the way to
  the all-minimum point.
* :func:`fill`: while some tensor can be raised within every budget, make the
  raise with the largest predicted loss *decrease* per unit of cost added;
  a raise that is not predicted to lower the loss is never made.
* :func:`confirm`: after probing once more at the planned widths, undo fills
  that the new predictions say cost loss (it only lowers widths: still feasible).
* :func:`spend`: what budget is left after that is spent on raises whose
  *measured* loss on the probe set (a forward pass at the raised widths) is
  lower. After the weight epochs the predictions of raises are near zero
  (the weights have adapted to their widths), so a predicted fill
  leaves budget unused that a wider tensor would turn into accuracy; measuring
  the loss of each candidate, as AIMET's and MCT's mixed-precision searches do,
  sees the gain of a large step (2 -> 4 bits) that a linearisation misses.
  Off by default (``measured_fill``): on full Fashion-MNIST at 1.73 % it spent
  the budget (1.09 -> 1.69 %) for +0.01 points after the weight epochs.
* :func:`exchange`: a measured local search that also lowers one width to
  raise another (``measured_exchange``, off by default: on full Fashion-MNIST
  +0.24 points at 3 %, -0.13 at 1 %, and its finish took up to 13 % of the run).

Termination: repair only lowers widths and fill and spend only raise them, at
least one width step per move, so each makes at most ``sum_t (len(allowed_t) - 1)``
moves; the loops are written with that bound (spend's with one re-measurement
per tensor between two moves). Repair ends within budget
because every metric is non-decreasing in every width (the registry's rule,
cost tables are validated for it) and the all-minimum point is feasible
(compress refuses infeasible budgets before training).

:func:`constraint_repair` is the plain CGGD finish (steps along the cost
directions only); it is bounded too, and hands over to :func:`repair` with a
note when the cost directions stall (a zero slope, e.g. tied table entries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

from cgmq_cli.cgmq import CostModel, Tensor, Widths, descend, unit

Predictions = Mapping[str, Mapping[int, float]]  # quantizer key -> width -> predicted loss change from the probed point


@dataclass(frozen=True)
class Move:
    tensor: str  # quantizer key
    label: str  # what it quantizes
    old: int
    new: int
    predicted_dloss: float  # the table's loss change of this move (predicted, or measured on the probe set)
    note: str = ""  # why a move that the rule alone would not make was made


def width_steps(tensors: list[Tensor], widths: Widths, down: bool) -> int:
    """How many single width steps the tensors can still take downwards (or upwards): the loops' bound."""
    return sum(t.quantizer.allowed.index(widths[t.key]) if down
               else len(t.quantizer.allowed) - 1 - t.quantizer.allowed.index(widths[t.key]) for t in tensors)


def _delta(pred: Predictions, t: Tensor, old: int, new: int) -> float:
    table = pred.get(t.key, {})
    return float(table.get(new, 0.0)) - float(table.get(old, 0.0))


def _moved(widths: Widths, t: Tensor, width: int) -> Widths:
    return {**widths, t.key: width}


def repair(tensors: list[Tensor], costs: CostModel, widths: Widths, pred: Predictions) -> tuple[Widths, list[Move]]:
    """Lower widths until every budget holds, cheapest predicted loss per cost saved in the violated budgets first."""
    widths, moves = dict(widths), []
    for _ in range(width_steps(tensors, widths, down=True) + 1):
        violated = costs.violated(widths)
        if not violated:
            return widths, moves
        move = _best_saving(tensors, costs, widths, pred, violated) or _unlock(tensors, widths, pred)
        if move is None:
            break
        moves.append(move)
        widths[move.tensor] = move.new
    raise RuntimeError("repair: a budget is violated with every tensor at its narrowest width; "
                       "the feasibility check before training should have refused this budget")


def _best_saving(tensors: list[Tensor], costs: CostModel, widths: Widths, pred: Predictions,
                 violated: Mapping[str, float]) -> Move | None:
    best, best_key = None, None
    for t in tensors:
        cur = widths[t.key]
        for new in reversed([w for w in t.quantizer.allowed if w < cur]):  # nearest first: ties keep the smaller jump
            saved = costs.saving(widths, _moved(widths, t, new), violated)
            if saved <= 0:
                continue  # saves nothing where it matters: look further down
            d = _delta(pred, t, cur, new)
            key = d / saved
            if best_key is None or key < best_key:
                best, best_key = Move(t.key, t.label, cur, new, d), key
    return best


def _unlock(tensors: list[Tensor], widths: Widths, pred: Predictions) -> Move | None:
    """No single move saves in a violated budget (only joint ones do, e.g. a table rewarding 2x2 alone):
    lower the tensor whose drop to its minimum is predicted cheapest. Progress toward the all-minimum point."""
    options = [(_delta(pred, t, widths[t.key], t.quantizer.allowed[0]), i, t) for i, t in enumerate(tensors)
               if widths[t.key] > t.quantizer.allowed[0]]
    if not options:
        return None
    d, _, t = min(options, key=lambda o: (o[0], o[1]))
    return Move(t.key, t.label, widths[t.key], t.quantizer.allowed[0], d,
                note="saves nothing alone; no single move saved in the violated budgets")


def fill(tensors: list[Tensor], costs: CostModel, widths: Widths, pred: Predictions) -> tuple[Widths, list[Move]]:
    """Raise widths while every budget holds, largest predicted loss decrease per cost added first.

    Only raises predicted to lower the loss (``pred < 0``) are made; a raise that
    adds no cost at all ranks before any that does.
    """
    widths, moves = dict(widths), []
    for _ in range(width_steps(tensors, widths, down=False) + 1):
        best, best_key = None, None
        for t in tensors:
            cur = widths[t.key]
            for new in [w for w in t.quantizer.allowed if w > cur]:
                after = _moved(widths, t, new)
                if costs.violated(after):
                    break  # costs only grow with the width
                d = _delta(pred, t, cur, new)
                if not d < 0:
                    continue
                added = costs.share(widths, after)
                key = (added <= 0, -d if added <= 0 else -d / added)
                if best_key is None or key > best_key:
                    best, best_key = Move(t.key, t.label, cur, new, d), key
        if best is None:
            return widths, moves
        moves.append(best)
        widths[best.tensor] = best.new
    raise AssertionError("fill made more moves than there are width steps")  # unreachable: each move raises a width


def spend(tensors: list[Tensor], costs: CostModel, widths: Widths, loss_at: Callable[[Widths], float],
          base: float) -> tuple[Widths, list[Move]]:
    """Raise widths within every budget while the measured probe-set loss falls, best loss fall per cost first.

    ``loss_at(widths)`` is the loss on the finish's fixed probe set at ``widths``
    (``base`` at the given ones). Each tensor's candidate is its next wider
    allowed width that keeps every budget; all are measured once, then the best
    (largest fall per unit of cost added; free raises first) is measured again
    at the current widths if another raise was made since, and made if the loss
    still falls. Measurements: one per tensor plus about two per raise.
    """
    widths, moves = dict(widths), []
    measured: dict[str, tuple[int, float, int]] = {}  # key -> (width, loss there, moves made when measured)

    def candidate(t: Tensor) -> int | None:
        up = [w for w in t.quantizer.allowed if w > widths[t.key]]
        return up[0] if up and not costs.violated(_moved(widths, t, up[0])) else None

    def measure(t: Tensor) -> None:
        new = candidate(t)
        if new is None:
            measured.pop(t.key, None)
        else:
            measured[t.key] = (new, loss_at(_moved(widths, t, new)), len(moves))

    for t in tensors:
        measure(t)
    by_key = {t.key: t for t in tensors}
    for _ in range((width_steps(tensors, widths, down=False) + 1) * (len(tensors) + 1)):
        best, best_key = None, None
        for key, (new, loss, _) in list(measured.items()):
            t = by_key[key]
            if candidate(t) != new:  # another raise used the budget it needed
                measured.pop(key)
                continue
            d = loss - base
            if not d < 0:
                continue
            added = costs.share(widths, _moved(widths, t, new))
            rank = (added <= 0, -d if added <= 0 else -d / added)
            if best_key is None or rank > best_key:
                best, best_key = t, rank
        if best is None:
            return widths, moves
        new, loss, when = measured[best.key]
        if when != len(moves):  # measured before the last raise: measure again at the current widths
            measure(best)
            continue
        moves.append(Move(best.key, best.label, widths[best.key], new, loss - base,
                          note="measured: the loss on the probe set fell"))
        widths[best.key], base = new, loss
        measure(best)
    raise AssertionError("spend made more measurements than its bound")  # unreachable: see the loop's bound


def exchange(tensors: list[Tensor], costs: CostModel, widths: Widths, loss_at: Callable[[Widths], float],
             base: float) -> tuple[Widths, list[Move]]:
    """Measured local search: move one width down and another up (or only one up) within every budget,
    taking the move with the lowest measured probe-set loss while it is lower than the current one.

    The gate rule can leave a layer's pair unbalanced (2-bit weights with 16-bit
    inputs, whose BOPs are twice those of 4x4): no single move within budget
    fixes that, an exchange does. ``loss_at``/``base`` are as in :func:`spend`.
    Each round measures every feasible exchange (``n * (n - 1)`` at most for
    ``n`` tensors, so it is meant for small graphs); each accepted move strictly
    lowers the measured loss, so no widths repeat, and the rounds are capped at
    ``sum_t (len(allowed_t) - 1) + 1``.
    """
    widths, moves = dict(widths), []
    rounds = width_steps(tensors, widths, down=True) + width_steps(tensors, widths, down=False) + 1
    for _ in range(rounds):
        best = None
        for up in tensors:
            ups = [w for w in up.quantizer.allowed if w > widths[up.key]]
            if not ups:
                continue
            raised = _moved(widths, up, ups[0])
            for down in [None, *[t for t in tensors if t is not up]]:
                cand = raised
                if down is not None:
                    downs = [w for w in down.quantizer.allowed if w < widths[down.key]]
                    if not downs:
                        continue
                    cand = _moved(cand, down, downs[-1])
                if costs.violated(cand):
                    continue
                loss = loss_at(cand)
                if loss < base and (best is None or loss < best[0]):
                    best = (loss, up, down, cand)
        if best is None:
            return widths, moves
        loss, up, down, cand = best
        note = "measured: the loss on the probe set fell"
        if down is not None:
            moves.append(Move(down.key, down.label, widths[down.key], cand[down.key], loss - base,
                              note=f"exchanged for a wider {up.label} (the pair's loss change); " + note))
        moves.append(Move(up.key, up.label, widths[up.key], cand[up.key], loss - base, note=note))
        widths, base = cand, loss
    return widths, moves


def confirm(tensors: list[Tensor], widths: Widths, before_fill: Widths, pred: Predictions) -> tuple[Widths, list[Move]]:
    """Undo fills that a second probe, taken at the filled widths, predicts to have raised the loss.

    For each filled tensor, the width between its pre-fill and its filled width
    with the lowest predicted loss is kept. Lowering never breaks a budget.
    """
    widths, moves = dict(widths), []
    for t in tensors:
        cur, old = widths[t.key], before_fill[t.key]
        if cur <= old:
            continue
        choices = [w for w in t.quantizer.allowed if old <= w < cur]
        best = min(choices, key=lambda w: (_delta(pred, t, cur, w), -w))
        d = _delta(pred, t, cur, best)
        if d < 0:
            moves.append(Move(t.key, t.label, cur, best, d, note="undone: the confirming probe predicts the fill raised the loss"))
            widths[t.key] = best
    return widths, moves


def constraint_repair(tensors: list[Tensor], costs: CostModel, widths_of: Callable[[], Widths], eta: float,
                      max_steps: int | None = None) -> tuple[Widths, str | None]:
    """Plain CGGD finish: step the gates along the violated budgets' cost directions until every budget holds.

    Bounded: at most ``max_steps`` steps (default: enough for every gate to cross
    its whole range ``len(tensors)`` times over). Returns the widths and None, or
    the widths reached and a note saying why it stopped early (a zero cost slope,
    or the bound): then the caller finishes with :func:`repair`.
    """
    if max_steps is None:
        span = max((math.log2(t.quantizer.allowed[-1] / t.quantizer.allowed[0]) for t in tensors), default=0.0)
        max_steps = max(1, math.ceil(span / eta)) * max(1, len(tensors))
    widths = widths_of()
    for _ in range(max_steps):
        violated = costs.violated(widths)
        if not violated:
            return widths, None
        step = sum(unit(costs.gradient(name, tensors, widths)) for name in violated)
        if not any(s > 0 and t.quantizer.neighbour(-1) is not None for t, s in zip(tensors, step.tolist())):
            return widths, ("the constraint finish stalled: no violated budget's cost falls along its gradient "
                            "(a zero slope, e.g. tied cost-table entries); finished with repair")
        descend(tensors, step, eta)
        widths = widths_of()
    if not costs.violated(widths):
        return widths, None
    return widths, f"the constraint finish did not meet the budget within {max_steps} steps; finished with repair"
