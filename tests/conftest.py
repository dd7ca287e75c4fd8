"""Shared fixtures: a briefly trained DigitsCNN checkpoint (made once per session)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("NO_COLOR", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def digits_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """state_dict of a DigitsCNN trained 4 epochs on digits (about 1 s)."""
    from cgmq_cli import data, models
    from cgmq_cli.trainer import train_float

    bundle = data.load_data("digits")
    loader, _ = data.make_loaders(bundle, 32, 0, 0)
    torch.manual_seed(0)  # the initial weights too: else they depend on the tests that ran before this fixture
    model = train_float(models.DigitsCNN(), loader, epochs=4, lr=3e-3, seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "digits_cnn.pt"
    torch.save(model.state_dict(), path)
    return str(path)
