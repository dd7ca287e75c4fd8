"""The concrete data sources behind ``cgmq compress --data SPEC``.

Each ``load_*`` function returns :class:`Splits` (train, val, class count, a
one-line description); :mod:`cgmq_cli.data` parses the spec, checks the
result and wraps it in a ``DataBundle``. Every user-facing problem is raised
as a :class:`~cgmq_cli.errors.DataError` with a hint saying how to fix it.

Small data (digits, IDX files) is held in memory as ``TensorDataset``s;
CIFAR-10 and image folders stay torchvision datasets with ``ToTensor``.
Heavy imports (torchvision, scikit-learn) are done lazily.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .errors import DataError

#: Where the Debian package ``dataset-fashion-mnist`` installs gzip'd IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

DIGITS_TRAIN_SIZE = 1437
DIGITS_SPLIT_SEED = 0

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Splits:
    """What a source loads: the two datasets plus metadata for the bundle."""

    train: Any
    val: Any
    num_classes: int | None
    description: str


def default_cache_dir() -> Path:
    """Where torchvision downloads go when a spec names no DIR."""
    return Path.home() / ".cache" / "cgmq" / "data"


def existing_dir(raw: str, spec: str) -> Path:
    """Return ``raw`` as an existing directory, or raise a DataError."""
    if not raw:
        raise DataError(f"--data {spec!r} names an empty directory", "write SPEC:DIR with a real directory")
    path = Path(raw).expanduser()
    if not path.exists():
        raise DataError(f"data directory {str(path)!r} does not exist", f"check the path in --data {spec!r}")
    if not path.is_dir():
        raise DataError(f"data path {str(path)!r} is not a directory", f"pass a directory in --data {spec!r}")
    return path


# ---------------------------------------------------------------- digits ---


def load_digits_splits() -> Splits:
    """scikit-learn's bundled 8x8 digits with the fixed, seed-independent split."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.from_numpy((raw.images / 16.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(raw.target.astype(np.int64))
    perm = torch.from_numpy(np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels)))
    tr, va = perm[:DIGITS_TRAIN_SIZE], perm[DIGITS_TRAIN_SIZE:]
    desc = (
        f"digits (scikit-learn load_digits): {len(tr)} train / {len(va)} val from a fixed "
        f"numpy default_rng({DIGITS_SPLIT_SEED}) permutation; float32 (1, 8, 8) = pixel/16 in [0, 1]"
    )
    return Splits(TensorDataset(images[tr], labels[tr]), TensorDataset(images[va], labels[va]), 10, desc)


# ------------------------------------------------------------------- IDX ---


def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently un-gzipping it (detected by magic, not name)."""
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if data[:2] == _GZIP_MAGIC else data
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read IDX file {str(path)!r}: {exc}", "re-download the file") from exc


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzip'd or raw) into a native-endian numpy array."""
    path = Path(path)
    data = _read_bytes(path)
    hint = "the file is not an IDX file or is corrupt; re-download it"
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"bad IDX magic number in {str(path)!r}", hint)
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"truncated IDX header in {str(path)!r}", hint)
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"IDX file {str(path)!r} holds {len(data) - header} data bytes, header says {expected}", hint
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_root(base: Path, torchvision_name: str) -> Path:
    """Pick ``base`` or torchvision's ``base/<Name>/raw`` layout, whichever has the files."""
    for cand in (base, base / torchvision_name / "raw"):
        if _find_idx(cand, IDX_NAMES["train_images"]) is not None:
            return cand
    return base


def _find_idx(folder: Path, stem: str) -> Path | None:
    """Return ``folder/stem`` or ``folder/stem.gz``, whichever exists."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_pair(folder: Path, images_key: str, labels_key: str, classes: int) -> TensorDataset:
    """Load one images/labels IDX pair as float32 (N, 1, H, W) in [0, 1] and int64 labels."""
    arrays = []
    for key in (images_key, labels_key):
        found = _find_idx(folder, IDX_NAMES[key])
        if found is None:
            raise DataError(
                f"missing IDX file {str(folder / IDX_NAMES[key])!r} (or .gz)",
                "the directory needs the four standard MNIST-format files, gzip'd or not",
            )
        arrays.append((found, read_idx(found)))
    (img_path, images), (lab_path, labels) = arrays
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{str(img_path)!r} is not a uint8 (N, H, W) image file", "check the file names")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{str(lab_path)!r} has shape {labels.shape}, expected ({len(images)},) labels",
            "images and labels files must come from the same split",
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"{str(lab_path)!r} has labels outside 0..{classes - 1}", "check the file")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


def load_idx_dir(base: Path, name: str, torchvision_name: str) -> Splits:
    """Load the MNIST-format train/t10k files found in ``base`` (or its torchvision layout)."""
    folder = _idx_root(base, torchvision_name)
    train = _idx_pair(folder, "train_images", "train_labels", 10)
    val = _idx_pair(folder, "val_images", "val_labels", 10)
    shape = tuple(train.tensors[0].shape[1:])
    desc = (
        f"{name} (IDX files in {folder}): train = train-* ({len(train)}), val = t10k-* ({len(val)}); "
        f"float32 {shape} = pixel/255 in [0, 1]"
    )
    return Splits(train, val, 10, desc)


def load_idx_default(name: str, torchvision_name: str) -> Splits:
    """mnist / fashion-mnist without DIR: Debian files, then the cache, then a download."""
    if name == "fashion-mnist" and _find_idx(DEBIAN_FASHION_MNIST_DIR, IDX_NAMES["train_images"]):
        return load_idx_dir(DEBIAN_FASHION_MNIST_DIR, name, torchvision_name)
    root = default_cache_dir()
    if _find_idx(root / torchvision_name / "raw", IDX_NAMES["train_images"]) is None:
        _torchvision_download(name, torchvision_name, root)
    return load_idx_dir(root / torchvision_name / "raw", name, torchvision_name)


def _torchvision_download(name: str, torchvision_name: str, root: Path) -> None:
    """Let torchvision download and extract the raw IDX files into ``root``."""
    import torchvision.datasets as tvd

    hint = f"pass {name}:DIR with the four IDX files"
    if name == "fashion-mnist":
        hint = "install the Debian package (apt-get install dataset-fashion-mnist) or " + hint
    try:
        getattr(tvd, torchvision_name)(root=str(root), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - any network/IO failure is the user's to fix
        raise DataError(f"cannot download {name} into {root}: {one_line(exc)}", hint) from exc


# --------------------------------------------------------------- CIFAR-10 ---


def load_cifar10(raw_dir: str | None, spec: str) -> Splits:
    """torchvision CIFAR-10 from DIR (never downloading) or the cache (downloading)."""
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    if raw_dir is None:
        root, download = default_cache_dir(), True
    else:
        root, download = existing_dir(raw_dir, spec), False
        if root.name == "cifar-10-batches-py":  # accept the extracted folder itself
            root = root.parent
    try:
        train = tvd.CIFAR10(str(root), train=True, download=download, transform=T.ToTensor())
        val = tvd.CIFAR10(str(root), train=False, download=download, transform=T.ToTensor())
    except Exception as exc:  # noqa: BLE001
        what = "download CIFAR-10 into" if download else "find CIFAR-10 in"
        raise DataError(
            f"cannot {what} {root}: {one_line(exc)}",
            "pass cifar10:DIR where DIR holds torchvision's cifar-10-batches-py folder",
        ) from exc
    desc = (
        f"cifar10 (torchvision, {root}): train = data_batch_1..5 ({len(train)}), "
        f"val = test_batch ({len(val)}); float32 (3, 32, 32) ToTensor in [0, 1]"
    )
    return Splits(train, val, 10, desc)


# ------------------------------------------------------------ imagefolder ---


def load_imagefolder(rest: str, spec: str) -> Splits:
    """torchvision ImageFolder on DIR/train and DIR/val, resized + center-cropped to SIZE."""
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    raw, size = _split_size(rest, spec)
    base = existing_dir(raw, spec)
    for sub in ("train", "val"):
        if not (base / sub).is_dir():
            raise DataError(
                f"image folder {str(base)!r} has no {sub}/ subfolder",
                "use DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg",
            )
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()])
    try:
        train = tvd.ImageFolder(str(base / "train"), transform=tf)
        val = tvd.ImageFolder(str(base / "val"), transform=tf)
    except Exception as exc:  # noqa: BLE001 - e.g. no class folders / no images
        raise DataError(
            f"cannot read image folder {str(base)!r}: {one_line(exc)}",
            "put images in DIR/<split>/<class>/",
        ) from exc
    if train.class_to_idx != val.class_to_idx:
        raise DataError(
            f"{str(base)!r}: train/ and val/ have different class folders",
            "use the same class names in both",
        )
    desc = (
        f"imagefolder ({base}): train = train/ ({len(train)}), val = val/ ({len(val)}), "
        f"{len(train.classes)} classes; RGB resized to {size} + center crop {size}x{size}, ToTensor in [0, 1]"
    )
    return Splits(train, val, len(train.classes), desc)


def _split_size(rest: str, spec: str) -> tuple[str, int]:
    """Split ``DIR@SIZE`` into (DIR, SIZE); SIZE defaults to 224."""
    head, sep, tail = rest.rpartition("@")
    if not sep or Path(rest).expanduser().is_dir():
        return rest, 224
    if not tail.isdigit() or int(tail) <= 0:
        raise DataError(
            f"bad image size {tail!r} in --data {spec!r}",
            "write imagefolder:DIR@224 (a positive integer)",
        )
    return head, int(tail)


def one_line(exc: BaseException) -> str:
    """``Type: message`` squeezed onto one line."""
    from cgmq_cli.sanitize import short

    if isinstance(exc, SystemExit):
        return f"SystemExit (the code called sys.exit({short(exc.code, 40)}))"
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
