"""--augment: which examples are transformed, which data it may transform, and who sees the data as it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cgmq_cli import augment, data, probes, qmodel, settings
from cgmq_cli.cost import Budget
from cgmq_cli.errors import UsageError
from cgmq_cli.trainer import TrainConfig, Trainer


def _images(n: int = 64) -> TensorDataset:
    x = torch.arange(n * 12, dtype=torch.float32).reshape(n, 1, 3, 4)  # every row differs from its mirror image
    return TensorDataset(x, torch.arange(n) % 3)


def test_a_seeded_half_of_the_examples_is_flipped_and_the_choice_depends_on_seed_epoch_and_index_only() -> None:
    source = _images()
    ds = augment.Augmented(source, "hflip", seed=3)
    flipped = [not torch.equal(ds[i][0], source[i][0]) for i in range(len(ds))]
    for i, f in enumerate(flipped):
        assert torch.equal(ds[i][0], source[i][0].flip(-1) if f else source[i][0]) and ds[i][1] == source[i][1]
    assert 16 < sum(flipped) < 48
    assert [not torch.equal(ds[i][0], source[i][0]) for i in reversed(range(64))] == flipped[::-1]  # order-free
    again = augment.Augmented(source, "hflip", seed=3)
    assert all(torch.equal(again[i][0], ds[i][0]) for i in range(64))
    ds.set_epoch(1)
    assert [not torch.equal(ds[i][0], source[i][0]) for i in range(64)] != flipped
    other_seed = augment.Augmented(source, "hflip", seed=4)
    assert [not torch.equal(other_seed[i][0], source[i][0]) for i in range(64)] != flipped


def test_choices_are_checked_against_the_data() -> None:
    assert augment.resolve("none", "tokens.py:fn", (16,), "int64") is None
    assert augment.resolve("hflip", "digits", (1, 8, 8), "float32") == "hflip"
    with pytest.raises(UsageError, match="transforms images"):
        augment.resolve("hflip", "tokens.py:fn", (16,), "int64")
    with pytest.raises(UsageError, match="unknown --augment 'vflip'"):
        augment.resolve("vflip", "digits", (1, 8, 8), "float32")


def test_the_setting_is_validated_like_a_flag_and_old_runs_keep_training_on_plain_data(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--augment 'flip': expected none, hflip"):
        settings.check_setting("augment", "flip", "--augment")
    base = dict(model="m.pt", data="digits", out=str(tmp_path / "run"))
    assert settings.resolve_compress(base, {"rel_bops": 2}, project_file=False).augment == "none"
    assert settings.resolve_compress({**base, "augment": "hflip"}, {"rel_bops": 2}, project_file=False).augment == "hflip"
    saved = settings.resolve_compress({**base, "augment": "hflip"}, {"rel_bops": 2}, project_file=False).as_dict()
    del saved["augment"]  # config.json of a run made before --augment existed
    assert settings.from_config(json.loads(json.dumps(saved)), "config.json").augment == "none"


def test_only_the_training_loader_is_augmented_and_the_probe_set_reads_the_plain_examples() -> None:
    source = _images()
    bundle = data.DataBundle("x", source, source, (1, 3, 4), 3, "test")
    train, val = data.make_loaders(bundle, 8, augment="hflip")
    assert isinstance(train.dataset, augment.Augmented) and val.dataset is source
    assert data.make_loaders(bundle, 8)[0].dataset is source
    plain = {tuple(r.flatten().tolist()) for r in source.tensors[0]}
    batches = probes.probe_set(train, 4, seed=1, epoch=0)
    assert all(tuple(r.flatten().tolist()) in plain for x, _ in batches for r in x)


def test_the_trainer_moves_the_augmentation_to_each_epoch() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(48, 1, 2, 6), torch.randint(0, 3, (48,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    qm = qmodel.prepare(model, (1, 2, 6), input_bits=8)
    qm.calibrate(x)
    seen = []

    class Recording(augment.Augmented):
        def set_epoch(self, epoch: int) -> None:
            seen.append(epoch)
            super().set_epoch(epoch)

    loader = DataLoader(Recording(TensorDataset(x, y), "hflip", 0), batch_size=16)
    config = TrainConfig(epochs=3, gate_steps=2, probe_batches=2)
    Trainer(qm, loader, loader, Budget(rel_bops=50.0), config, seed=0).run()
    assert seen[1:] == [0, 1, 2]  # the constructor sets epoch 0, then each epoch of the schedule


def test_the_augmented_set_pickles_for_spawned_workers_and_flips_numpy_examples() -> None:
    import pickle

    import numpy as np

    ds = augment.Augmented(_images(), "hflip", seed=3)
    copy = pickle.loads(pickle.dumps(ds))  # DataLoader workers started by spawn or forkserver get it this way
    assert all(torch.equal(copy[i][0], ds[i][0]) for i in range(len(ds)))
    arrays = [(np.arange(12, dtype=np.float32).reshape(1, 3, 4), 0)] * 64  # a --data function yielding numpy
    flipped = augment.Augmented(arrays, "hflip", seed=3)
    chosen = [i for i in range(64) if not np.array_equal(flipped[i][0], arrays[i][0])]
    assert chosen and all(np.array_equal(flipped[i][0], arrays[i][0][..., ::-1]) for i in chosen)
    batch = next(iter(DataLoader(flipped, batch_size=64)))[0]  # flipped and plain examples collate together
    assert batch.shape == (64, 1, 3, 4)


def test_the_probe_set_unwraps_only_the_augmentation_not_a_dataset_with_a_source_attribute() -> None:
    class Named(TensorDataset):
        source = "images/train"  # a user's dataset that happens to name where it came from

    named = Named(*_images().tensors)
    batches = probes.probe_set(DataLoader(named, batch_size=8), 2, seed=0, epoch=0)
    assert len(batches) == 2 and batches[0][0].shape == (8, 1, 3, 4)
