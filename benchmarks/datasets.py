"""Data sets the benchmarks pass as ``--data benchmarks/datasets.py:FN`` (each FN() returns (train, val)).

* ``fmnist_holdout``: Fashion-MNIST's 60,000 training images split by a fixed permutation (seed 0)
  into 50,000 for training and 10,000 held out for validation. The recipe sweep chooses defaults
  on the held-out images, so the test set (``t10k``) stays for the benchmark.
* ``fmnist_holdout_10k``: the first 10,000 of those 50,000 for training, the same 10,000 held out.
* ``fmnist112``: Fashion-MNIST resized to 3 x 112 x 112 (bilinear, the grey channel repeated),
  4,096 training images and 512 test images, for timing resnet18 at 112 x 112.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

from cgmq_cli import data


def _fmnist() -> tuple[TensorDataset, TensorDataset]:
    bundle = data.load_data("fashion-mnist")
    return bundle.train, bundle.val


def _split(n_train: int) -> tuple[TensorDataset, TensorDataset]:
    train, _ = _fmnist()
    x, y = train.tensors
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    held, rest = order[:10_000], order[10_000:10_000 + n_train]
    return TensorDataset(x[rest], y[rest]), TensorDataset(x[held], y[held])


def fmnist_holdout() -> tuple[TensorDataset, TensorDataset]:
    return _split(50_000)


def fmnist_holdout_10k() -> tuple[TensorDataset, TensorDataset]:
    return _split(10_000)


class _Resized(Dataset):
    """28 x 28 grey images served as 3 x SIZE x SIZE (resized on the fly)."""

    def __init__(self, base: TensorDataset, size: int) -> None:
        self.x, self.y = base.tensors
        self.size = size

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = F.interpolate(self.x[i : i + 1], size=(self.size, self.size), mode="bilinear", align_corners=False)
        return img[0].expand(3, -1, -1).contiguous(), self.y[i]


def fmnist112() -> tuple[Dataset, Dataset]:
    train, test = _fmnist()
    tx, ty = train.tensors
    vx, vy = test.tensors
    return (_Resized(TensorDataset(tx[:4096], ty[:4096]), 112), _Resized(TensorDataset(vx[:512], vy[:512]), 112))
