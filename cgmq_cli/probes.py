"""The fixed probe set of a finish, and the finish's table of loss changes taken on it.

A finish scores every move on the same data: ``probe_set`` draws a fixed,
seeded sample of training examples (the same for every move of one finish,
another for the next finish, the same again when a run resumes), split into
batches of the training batch size. Under torchrun each rank takes its share
of the same sample, so averaging over ranks gives the table of the whole set.

The table (tensor -> width -> loss change of moving that tensor alone there)
is measured (:func:`measure`: one forward pass over the probe set per move)
or predicted to second order from one probe pass (:func:`predict`)::

    <g, e> + B/2 * sum((g * e)^2),   g = dL/dQ,  e = Q_w(x) - Q_b(x)

(the diagonal empirical Fisher in place of the Hessian, for a loss that is a
mean over the batch's B examples; see :mod:`cgmq_cli.quant.modules`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils.data import default_collate

from cgmq_cli.augment import Augmented

Batch = tuple[torch.Tensor, torch.Tensor]
Table = dict[str, dict[int, float]]  # quantizer key -> width -> loss change from the probed widths
BatchLoss = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]  # None: a non-finite loss, skipped


def probe_set(loader: Any, batches: int, seed: int, epoch: int, world: int = 1, rank: int = 0) -> list[Batch]:
    """``batches`` batches of training examples, drawn with a generator seeded by (seed, epoch); not augmented."""
    dataset = loader.dataset
    if isinstance(dataset, Augmented):
        dataset = dataset.source  # the examples as they are
    size = loader.batch_size or 1  # per rank
    n = min(len(dataset), batches * size * world)
    n -= n % world  # every rank gets the same number of examples (and batches)
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    index = torch.randperm(len(dataset), generator=gen)[:n][rank::world]
    collate = getattr(loader, "collate_fn", None) or default_collate
    return [collate([dataset[int(i)] for i in chunk]) for chunk in index.split(size)]


def calibration_inputs(batches: Sequence[Batch], n: int = 256) -> torch.Tensor:
    """Up to ``n`` inputs of the probe set, stacked (for re-calibrating steps)."""
    xs, count = [], 0
    for x, _ in batches:
        xs.append(x[: n - count])
        count += len(xs[-1])
        if count >= n:
            break
    return torch.cat(xs)


def as_predictions(keys: Sequence[str], allowed: Mapping[str, Sequence[int]], table: torch.Tensor) -> dict[str, dict[int, float]]:
    """Rows of accumulated table probes (already averaged) -> key -> width -> predicted loss change."""
    return {key: {w: float(table[i, j]) for j, w in enumerate(allowed[key])} for i, key in enumerate(keys)}


def predict(qm: Any, tensors: Sequence[Any], batches: Sequence[Batch], loss_of: BatchLoss, dist: Any) -> tuple[Table, int]:
    """The second-order table of ``tensors`` at the model's widths, averaged over the batches whose loss
    ``loss_of`` found finite (and over ranks); also how many batches were used."""
    keys = [t.key for t in tensors]
    if not keys:  # every width is fixed: nothing to predict (and no gradient to take)
        return {}, 0
    allowed = {t.key: t.quantizer.allowed for t in tensors}
    total = torch.zeros((len(keys), max(len(a) for a in allowed.values())), dtype=torch.float64)
    used = 0
    qm.set_table_probe(keys)
    qm.gm.eval()
    try:
        for x, y in batches:
            loss = loss_of(x, y)
            if loss is None:
                continue
            loss.backward()
            for i, (first, squares) in enumerate(qm.table_grads(keys).values()):
                row = torch.tensor(first, dtype=torch.float64) + 0.5 * len(y) * torch.tensor(squares, dtype=torch.float64)
                total[i, : len(first)] += row
            used += 1
    finally:
        qm.set_table_probe(None)
    total = dist.mean(total / max(used, 1))
    return as_predictions(keys, allowed, total), used


def probe_loss(qm: Any, batches: Sequence[Batch], widths: Mapping[str, int], forward_loss: BatchLoss,
               dist: Any) -> tuple[float, int]:
    """The mean loss over the finite-loss batches at ``widths`` (over every rank's; +inf when none was
    finite, so no move is ever measured as a gain) and this rank's count of them. The model stays at ``widths``."""
    qm.set_widths(dict(widths))
    qm.gm.eval()
    total, used = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            loss = forward_loss(x, y)
            if loss is not None and bool(torch.isfinite(loss)):
                total, used = total + float(loss), used + 1
    total_all, used_all = dist.sum(torch.tensor([total, float(used)], dtype=torch.float64)).tolist()
    return (total_all / used_all if used_all > 0 else math.inf), used


def measure(qm: Any, tensors: Sequence[Any], batches: Sequence[Batch], widths: Mapping[str, int],
            forward_loss: BatchLoss, dist: Any) -> tuple[Table | None, int]:
    """The measured table: the probe-set loss change of moving each tensor alone from ``widths`` to each
    allowed width (one forward pass over the probe set per move), and the batches used; None when no probe
    batch had a finite loss. The model is left at ``widths``."""
    base, used = probe_loss(qm, batches, widths, forward_loss, dist)
    if not math.isfinite(base):
        return None, used
    table = {t.key: {w: (0.0 if w == widths[t.key]
                         else probe_loss(qm, batches, {**widths, t.key: w}, forward_loss, dist)[0] - base)
                     for w in t.quantizer.allowed} for t in tensors}
    qm.set_widths(dict(widths))
    return table, used
