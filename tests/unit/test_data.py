"""Unit tests for dataset specs, the IDX reader and the loaders (cgmq_cli.data)."""

from __future__ import annotations

import gzip
import struct
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from cgmq_cli import data_sources
from cgmq_cli.data import DataBundle, calibration_batch, load_data, make_loaders
from cgmq_cli.data_sources import DEBIAN_FASHION_MNIST_DIR, read_idx
from cgmq_cli.errors import DataError


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data("digits")


# ------------------------------------------------------------------ digits ---


def test_digits_shapes_range_labels_and_split(digits: DataBundle) -> None:
    assert digits.name == "digits"
    assert (len(digits.train), len(digits.val)) == (1437, 360)
    assert digits.sample_shape == (1, 8, 8)
    assert digits.num_classes == 10
    x, y = digits.train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8)
    assert y.dtype == torch.int64
    xs = digits.train.tensors[0]
    assert float(xs.min()) == 0.0 and float(xs.max()) == 1.0
    labels = torch.cat([digits.train.tensors[1], digits.val.tensors[1]])
    assert sorted(labels.unique().tolist()) == list(range(10))
    assert "1437" in digits.description and "default_rng(0)" in digits.description


def test_digits_split_is_fixed_and_independent_of_seed(digits: DataBundle) -> None:
    from sklearn.datasets import load_digits

    other = load_data("digits", seed=123)
    assert torch.equal(other.train.tensors[0], digits.train.tensors[0])
    assert torch.equal(other.val.tensors[1], digits.val.tensors[1])
    perm = np.random.default_rng(0).permutation(1797)
    raw = load_digits()
    expected = torch.from_numpy((raw.images[perm[1437:]] / 16).astype(np.float32)).unsqueeze(1)
    assert torch.equal(digits.val.tensors[0], expected)


def test_digits_rejects_a_dir() -> None:
    with pytest.raises(DataError, match="takes no DIR"):
        load_data("digits:/tmp")


# ------------------------------------------------------------------ subset ---


def test_subset_is_seeded_and_leaves_val_alone(digits: DataBundle) -> None:
    a = load_data("digits", subset=100, seed=1)
    b = load_data("digits", subset=100, seed=1)
    c = load_data("digits", subset=100, seed=2)
    assert len(a.train) == 100 and len(a.val) == 360
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    assert "subset" in a.description
    assert len(load_data("digits", subset=10_000).train) == 1437


@pytest.mark.parametrize("n", [0, -3])
def test_subset_must_be_positive(n: int) -> None:
    with pytest.raises(DataError, match="subset"):
        load_data("digits", subset=n)


# ----------------------------------------------------------------- loaders ---


def test_make_loaders_is_reproducible(digits: DataBundle) -> None:
    first = [next(iter(make_loaders(digits, 16, seed=7)[0]))[1] for _ in range(2)]
    other = next(iter(make_loaders(digits, 16, seed=8)[0]))[1]
    assert torch.equal(first[0], first[1])
    assert not torch.equal(first[0], other)
    _, val = make_loaders(digits, 16)
    assert torch.equal(next(iter(val))[1], digits.val.tensors[1][:16])  # val in order


@pytest.mark.parametrize("bs", [0, -1])
def test_make_loaders_rejects_bad_batch_size(digits: DataBundle, bs: int) -> None:
    with pytest.raises(DataError, match="batch size"):
        make_loaders(digits, bs)


def test_distributed_needs_a_process_group(digits: DataBundle) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is already running")
    with pytest.raises(DataError, match="process group"):
        make_loaders(digits, 8, distributed=True)


def test_distributed_samplers_single_process(digits: DataBundle, tmp_path: Path) -> None:
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialized")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        train, val = make_loaders(digits, 8, seed=3, distributed=True)
        assert train.sampler.shuffle and train.sampler.seed == 3
        assert len(list(val)) == 45  # 360 / 8, all examples on the only rank
        single, _ = make_loaders(digits, 8, seed=3)  # the same order without a process group
        assert all(torch.equal(a[0], b[0]) for a, b in zip(train, single))
    finally:
        dist.destroy_process_group()


def test_global_batch_is_sharded_across_ranks(digits: DataBundle) -> None:
    """Rank r takes every world-th example: the union of the ranks' batch i is batch i of one process."""
    from torch.utils.data.distributed import DistributedSampler

    single = list(DistributedSampler(digits.train, num_replicas=1, rank=0, shuffle=True, seed=5))[:16]
    ranks = [list(DistributedSampler(digits.train, num_replicas=2, rank=r, shuffle=True, seed=5))[:8] for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(single)


def test_calibration_batch_is_fixed(digits: DataBundle) -> None:
    a = calibration_batch(digits, 64, seed=0)
    assert a.shape == (64, 1, 8, 8)
    assert torch.equal(a, calibration_batch(digits, 64, seed=0))
    assert calibration_batch(digits, 5000).shape[0] == 1437
    with pytest.raises(DataError):
        calibration_batch(digits, 0)


# --------------------------------------------------------------------- IDX ---


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_mnist_dir(folder: Path, n_train: int = 6, n_val: int = 4, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        files = {
            f"{prefix}-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28)),
            f"{prefix}-labels-idx1-ubyte": np.arange(n) % 10,
        }
        for name, arr in files.items():
            raw = _idx_bytes(np.asarray(arr))
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_gzip_and_raw(tmp_path: Path, gz: bool) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.gz" if gz else "a")
    path.write_bytes(gzip.compress(_idx_bytes(arr)) if gz else _idx_bytes(arr))
    assert np.array_equal(read_idx(path), arr)


def test_read_idx_bad_magic_and_truncated(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 2) + b"\x00\x01")
    with pytest.raises(DataError, match="bad IDX magic"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 5) + b"\x00")
    with pytest.raises(DataError, match="header says 5"):
        read_idx(short)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_dir(tmp_path: Path, gz: bool) -> None:
    _write_mnist_dir(tmp_path, gz=gz)
    b = load_data(f"mnist:{tmp_path}")
    assert (len(b.train), len(b.val)) == (6, 4)
    assert b.sample_shape == (1, 28, 28) and b.num_classes == 10
    x, y = b.train[3]
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert int(y) == 3


def test_fashion_mnist_torchvision_layout(tmp_path: Path) -> None:
    _write_mnist_dir(tmp_path / "FashionMNIST" / "raw")
    b = load_data(f"fashion-mnist:{tmp_path}")
    assert len(b.train) == 6 and "FashionMNIST" in b.description


def test_missing_idx_file_is_named(tmp_path: Path) -> None:
    _write_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_data(f"mnist:{tmp_path}")


def test_corrupt_idx_in_dir(tmp_path: Path) -> None:
    _write_mnist_dir(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\xff\xff\xff\xff"))
    with pytest.raises(DataError, match="magic"):
        load_data(f"mnist:{tmp_path}")


def test_empty_idx_dataset(tmp_path: Path) -> None:
    _write_mnist_dir(tmp_path, n_val=0)
    with pytest.raises(DataError, match="val split is empty"):
        load_data(f"mnist:{tmp_path}")


def test_missing_and_non_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"mnist:{tmp_path / 'nope'}")
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        load_data(f"fashion-mnist:{tmp_path / 'f'}")


def test_download_failure_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tvd

    def offline(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(data_sources, "default_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(tvd, "MNIST", offline)
    with pytest.raises(DataError, match="cannot download mnist") as info:
        load_data("mnist")
    assert "mnist:DIR" in (info.value.hint or "")


def test_default_mnist_uses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_mnist_dir(tmp_path / "MNIST" / "raw")
    monkeypatch.setattr(data_sources, "default_cache_dir", lambda: tmp_path)
    assert len(load_data("mnist").train) == 6


@pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_from_debian_package() -> None:
    b = load_data("fashion-mnist", subset=50)
    assert (len(b.train), len(b.val)) == (50, 10_000)
    assert b.sample_shape == (1, 28, 28) and b.num_classes == 10
    assert str(DEBIAN_FASHION_MNIST_DIR) in b.description
    assert float(b.val.tensors[0].max()) == 1.0


# ------------------------------------------------------------- imagefolder ---


def test_imagefolder(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / split / cls / "a.png")
    b = load_data(f"imagefolder:{tmp_path}@8")
    assert b.sample_shape == (3, 8, 8) and b.num_classes == 2
    assert float(b.train[0][0][0].max()) == 1.0
    with pytest.raises(DataError, match="bad image size"):
        load_data(f"imagefolder:{tmp_path}@0")
    (tmp_path / "val").rename(tmp_path / "validation")
    with pytest.raises(DataError, match="no val/"):
        load_data(f"imagefolder:{tmp_path}")


# --------------------------------------------------------------- user code ---

USER_MODULE = """
import torch
from torch.utils.data import TensorDataset

class Named(TensorDataset):
    classes = ["a", "b", "c"]

def good():
    x = torch.zeros(5, 2, 3)
    y = torch.arange(5)
    return Named(x, y), TensorDataset(x[:2], y[:2])

def boom():
    raise ValueError("no data\\nhere")

def wrong():
    return [1, 2, 3]

def empty():
    return TensorDataset(torch.zeros(0, 2)), TensorDataset(torch.zeros(1, 2))
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cgmq_test_userdata.py"
    path.write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cgmq_test_userdata", raising=False)
    return path


def test_module_fn_spec(user_module: Path) -> None:
    b = load_data("cgmq_test_userdata:good")
    assert b.sample_shape == (2, 3) and b.num_classes == 3
    assert (len(b.train), len(b.val)) == (5, 2)


def test_file_fn_spec(user_module: Path) -> None:
    b = load_data(f"{user_module}:good", subset=2)
    assert len(b.train) == 2 and b.name == "cgmq_test_userdata.py:good"


def test_fn_that_raises(user_module: Path) -> None:
    with pytest.raises(DataError) as info:
        load_data(f"{user_module}:boom")
    msg = str(info.value)
    assert "ValueError: no data here" in msg and "boom" in msg and "\n" not in msg


def test_fn_wrong_return_type(user_module: Path) -> None:
    with pytest.raises(DataError, match="not a \\(train, val\\) pair"):
        load_data("cgmq_test_userdata:wrong")


def test_fn_missing_and_empty(user_module: Path) -> None:
    with pytest.raises(DataError, match="no function 'nope'"):
        load_data("cgmq_test_userdata:nope")
    with pytest.raises(DataError, match="train split is empty"):
        load_data("cgmq_test_userdata:empty")
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"{user_module.parent / 'missing.py'}:good")


# ----------------------------------------------------------------- unknown ---


@pytest.mark.parametrize(
    ("spec", "guess"), [("mnsit", "mnist"), ("fashion_mnist", "fashion-mnist"), ("digit", "digits")]
)
def test_unknown_spec_did_you_mean(spec: str, guess: str) -> None:
    with pytest.raises(DataError, match="unknown --data spec") as info:
        load_data(spec)
    assert f"did you mean {guess!r}" in (info.value.hint or "")
    assert "imagefolder:DIR" in (info.value.hint or "")


def test_unknown_module_spec() -> None:
    with pytest.raises(DataError, match="no module named 'cifr10'") as info:
        load_data("cifr10:load")
    assert "did you mean 'cifar10'" in (info.value.hint or "")


def test_tensor_dataset_type_kept_for_idx(tmp_path: Path) -> None:
    _write_mnist_dir(tmp_path)
    assert isinstance(load_data(f"mnist:{tmp_path}", subset=3).train, TensorDataset)
