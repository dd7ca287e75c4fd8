"""Training-time data augmentation (``cgmq compress --augment``): the one registry of augmentations.

``none`` (the default) trains on the data as it is; a name from
:data:`AUGMENTATIONS` transforms the training examples. Only the training
loader's examples are augmented: validation, calibration and the finish's
probe set (which reads :attr:`Augmented.source`) see the data as it is.
Whether example ``i`` is transformed in epoch ``e`` depends on (seed, e, i)
only, so a run is the same with any number of DataLoader workers or torchrun
processes, and a resumed run repeats the epochs it would have run.

Not the default: on held-out Fashion-MNIST ``hflip`` gained LeNet-5 +0.02 to
+0.36 points, but cost the residual CNN 0.36 points (benchmarks/results/recipe.md,
``fin2+hflip``), and on the test set LeNet-5 gained only at 1.73 %.
"""

from __future__ import annotations

from typing import Any, Callable

from .errors import UsageError  # no torch at import: settings.py reads CHOICES when the CLI starts


def _hflip(x: Any) -> Any:
    """A horizontal flip: mirror the last axis (an image's width) of a tensor or a numpy array."""
    if hasattr(x, "flip"):
        return x.flip(-1)
    import numpy as np

    return np.ascontiguousarray(np.flip(x, -1))


#: name -> the transform of one chosen example's input (module-level functions: DataLoader workers
#: started by spawn or forkserver receive the dataset pickled)
AUGMENTATIONS: dict[str, Callable[[Any], Any]] = {
    "hflip": _hflip,
}
CHOICES = ("none", *AUGMENTATIONS)


def resolve(choice: str, source: str, sample_shape: tuple[int, ...], sample_dtype: str) -> str | None:
    """The augmentation ``--augment choice`` names (None: none), refused where data ``source``'s inputs
    are not images."""
    if choice not in CHOICES:
        raise UsageError(f"unknown --augment {choice!r}", f"use one of: {', '.join(CHOICES)}")
    if choice == "none":
        return None
    if sample_dtype != "float32" or len(sample_shape) < 2:
        raise UsageError(f"--augment {choice} transforms images, but --data {source} yields "
                         f"{sample_dtype} inputs of shape {tuple(sample_shape)}", "pass --augment none")
    return choice


class Augmented:  # a map-style dataset
    """``source`` with augmentation ``name`` applied to a seeded half of its examples in each epoch."""

    def __init__(self, source: Any, name: str, seed: int) -> None:
        self.source, self.name, self.seed = source, name, int(seed)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        import torch

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(epoch) + 7_919)
        self._chosen = torch.rand(len(self.source), generator=gen) < 0.5

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Any:
        x, *rest = self.source[i]
        if self._chosen[i]:
            x = AUGMENTATIONS[self.name](x)
        return (x, *rest)
