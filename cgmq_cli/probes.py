"""The fixed probe set of a finish, and what the probes predict.

A finish scores every move on the same data: ``probe_set`` draws a fixed,
seeded sample of training examples (the same for every move of one finish,
another for the next finish, the same again when a run resumes), split into
batches of the training batch size. Under torchrun each rank takes its share
of the same sample, so averaging over ranks gives the prediction of the whole set.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import default_collate

Batch = tuple[torch.Tensor, torch.Tensor]


def probe_set(loader: Any, batches: int, seed: int, epoch: int, world: int = 1, rank: int = 0) -> list[Batch]:
    """``batches`` batches of training examples, drawn with a generator seeded by (seed, epoch)."""
    dataset = loader.dataset
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
