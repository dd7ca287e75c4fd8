"""A model whose right answers are easy to see: a costly layer (64x256 MACs) and a cheap one (256x4 MACs)."""

from __future__ import annotations

import torch
from torch import nn

from cgmq_cli import qmodel


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(64, 256)
        self.small = nn.Linear(256, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.small(torch.relu(self.big(x)))


def prepared() -> qmodel.QuantizedModel:
    """TwoLayers with quantizers, calibrated (seed 0); big's input is the network input: fixed 8 bits."""
    torch.manual_seed(0)
    qm = qmodel.prepare(TwoLayers(), (64,), input_bits=8)
    qm.calibrate(torch.randn(32, 64))
    return qm
