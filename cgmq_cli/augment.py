"""Training-time data augmentation (``cgmq compress --augment``): the one registry of augmentations.

``auto`` (the default) uses the standard augmentation of a built-in dataset
(:data:`STANDARD`) and none for every other source, whose own transforms are
the user's; ``none`` turns it off; a name from :data:`AUGMENTATIONS` forces it.

Only the training loader's examples are augmented. Validation, calibration
and the finish's probe set (which reads :attr:`Augmented.source`) see the
data as it is. Whether example ``i`` is transformed in epoch ``e`` depends on
(seed, e, i) only, so a run is the same with any number of DataLoader workers
or torchrun processes, and a resumed run repeats the epochs it would have run.
"""

from __future__ import annotations

from typing import Any, Callable

from .errors import UsageError  # no torch at import: settings.py reads CHOICES when the CLI starts

#: name -> (what it does, the transform of one example's input)
AUGMENTATIONS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "hflip": ("a random horizontal flip (mirror the last axis) of half the training images",
              lambda x: x.flip(-1)),
}
#: built-in --data source -> its augmentation under ``auto``; measured on held-out Fashion-MNIST
#: (benchmarks/results/recipe.md, ``+hflip``). Sources not listed get none.
STANDARD = {"fashion-mnist": "hflip"}
CHOICES = ("auto", "none", *AUGMENTATIONS)


def chosen(choice: str, source: str) -> str | None:
    """The augmentation ``--augment choice`` names on data ``source`` (a built-in name), None for none."""
    if choice not in CHOICES:
        raise UsageError(f"unknown --augment {choice!r}", f"use one of: {', '.join(CHOICES)}")
    return STANDARD.get(source) if choice == "auto" else (None if choice == "none" else choice)


def resolve(choice: str, source: str, sample_shape: tuple[int, ...], sample_dtype: str) -> str | None:
    """:func:`chosen`, refused where the data's inputs are not images."""
    name = chosen(choice, source)
    if name is not None and (sample_dtype != "float32" or len(sample_shape) < 2):
        raise UsageError(f"--augment {choice} transforms images, but --data {source} yields "
                         f"{sample_dtype} inputs of shape {tuple(sample_shape)}", "pass --augment none")
    return name


class Augmented:  # a map-style dataset
    """``source`` with augmentation ``name`` applied to a seeded half of its examples in each epoch."""

    def __init__(self, source: Any, name: str, seed: int) -> None:
        self.source, self.name, self.seed = source, name, int(seed)
        self._transform = AUGMENTATIONS[name][1]
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        import torch

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(epoch) + 7_919)
        self.epoch = int(epoch)
        self._chosen = torch.rand(len(self.source), generator=gen) < 0.5

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Any:
        x, *rest = self.source[i]
        if self._chosen[i]:
            x = self._transform(x)
        return (x, *rest)
