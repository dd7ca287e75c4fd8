"""Dataset specs (``cgmq compress --data SPEC``) -> datasets and loaders.

Spec forms
----------
``digits``
    scikit-learn's bundled 8x8 digits (offline). Inputs float32 (1, 8, 8) =
    pixel/16 in [0, 1], int64 labels, 10 classes. The split is FIXED and does
    not depend on ``seed``: ``numpy.random.default_rng(0).permutation(1797)``;
    its first 1437 indices are train, the last 360 are val.
``mnist[:DIR]``, ``fashion-mnist[:DIR]``
    MNIST-format IDX files (gzip'd or not) in DIR or torchvision's
    ``DIR/MNIST/raw`` / ``DIR/FashionMNIST/raw``; train = ``train-*`` (60k),
    val = ``t10k-*`` (10k); float32 (1, 28, 28) = pixel/255. Without DIR,
    fashion-mnist uses the Debian package ``dataset-fashion-mnist``
    (``/usr/share/datasets/fashion-mnist/*.gz``) when installed; otherwise
    torchvision downloads into ``~/.cache/cgmq/data``.
``cifar10[:DIR]``
    torchvision CIFAR-10 (3, 32, 32) in [0, 1]; downloads only without DIR.
``imagefolder:DIR[@SIZE]``
    torchvision ImageFolder on ``DIR/train`` and ``DIR/val``; resize to SIZE
    (default 224) and center-crop SIZE x SIZE, ToTensor in [0, 1].
``module:fn``, ``path/to/file.py:fn``
    ``fn()`` returns ``(train, val)`` datasets yielding ``(input, target)``.
    A module named like a built-in dataset (``mnist``...) cannot be used.

``subset=N`` keeps the first N examples of a ``seed``-ed permutation of train
(val is untouched), so small runs stay reproducible.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from . import data_sources as src
from .augment import Augmented
from .errors import DataError

BUILTIN = ("digits", "mnist", "fashion-mnist", "cifar10", "imagefolder")
SPEC_FORMS = (
    "digits, mnist[:DIR], fashion-mnist[:DIR], cifar10[:DIR], "
    "imagefolder:DIR[@SIZE], module:fn, path/to/file.py:fn"
)
_MODULE_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_IDENT_RE = re.compile(r"^[A-Za-z_]\w*$")


@dataclass(frozen=True)
class DataBundle:
    """A loaded dataset: both splits plus what the model and report need to know."""

    name: str
    train: Dataset
    val: Dataset
    sample_shape: tuple[int, ...]
    num_classes: int | None
    description: str
    sample_dtype: str = "float32"  # of the inputs: float32, or int64 for token ids


def load_data(spec: str, subset: int | None = None, seed: int = 0) -> DataBundle:
    """Load the dataset named by ``spec`` (see the module docstring for the forms)."""
    spec = spec.strip()
    name, splits = _dispatch(spec)
    _check_nonempty(spec, splits)
    train, desc = splits.train, splits.description
    if subset is not None:
        train = _take_subset(train, subset, seed)
        desc += f"; train subset: first {len(train)} of a seed-{seed} permutation"
    shape, dtype = _sample_shape(spec, train)
    return DataBundle(name, train, splits.val, shape, splits.num_classes, desc, dtype)


def _dispatch(spec: str) -> tuple[str, src.Splits]:
    """Route a spec to its source; returns (bundle name, splits)."""
    head, sep, rest = spec.partition(":")
    arg = rest if sep else None
    if head == "digits":
        if sep:
            raise DataError(f"--data {spec!r}: digits is bundled and takes no DIR", "write --data digits")
        return head, src.load_digits_splits()
    if head in ("mnist", "fashion-mnist"):
        tv_name = "MNIST" if head == "mnist" else "FashionMNIST"
        if arg is None:
            return head, src.load_idx_default(head, tv_name)
        return head, src.load_idx_dir(src.existing_dir(arg, spec), head, tv_name)
    if head == "cifar10":
        return head, src.load_cifar10(arg, spec)
    if head == "imagefolder":
        if arg is None:
            raise DataError("--data imagefolder needs a directory", "write imagefolder:DIR[@SIZE]")
        return head, src.load_imagefolder(arg, spec)
    target, _, fn_name = spec.rpartition(":")
    if target.endswith(".py") and _IDENT_RE.match(fn_name):
        return f"{Path(target).name}:{fn_name}", _call_user_fn(spec, _load_file(spec, target), fn_name)
    if _MODULE_RE.match(target) and _IDENT_RE.match(fn_name) and head not in BUILTIN:
        return spec, _call_user_fn(spec, _import_module(spec, target), fn_name)
    raise DataError(f"unknown --data spec {spec!r}", _forms_hint(head))


def _forms_hint(word: str) -> str:
    """The valid forms, plus a difflib suggestion when ``word`` is close to one."""
    close = difflib.get_close_matches(word, BUILTIN, n=1, cutoff=0.6)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f"{guess}valid forms: {SPEC_FORMS}"


# ------------------------------------------------------------ user code ---


def _load_file(spec: str, path_text: str) -> Any:
    """Execute a user's ``file.py`` as a fresh module (registered in sys.modules)."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist", f"check the path in --data {spec!r}")
    mod_name = "cgmq_user_data_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    mod_spec = importlib.util.spec_from_file_location(mod_name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise DataError(f"cannot load {str(path)!r} as a Python module", "pass a .py file")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_name] = module  # lets worker processes / pickling find it
    try:
        mod_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code may raise (or exit) anything
        sys.modules.pop(mod_name, None)
        raise DataError(
            f"--data {spec!r}: importing {str(path)!r} raised {src.one_line(exc)}",
            "fix the file",
        ) from exc
    return module


def _import_module(spec: str, mod_name: str) -> Any:
    """Import ``mod_name``; a missing module gets the did-you-mean hint too."""
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and mod_name.startswith(exc.name):
            raise DataError(
                f"unknown --data spec {spec!r}: no module named {exc.name!r}",
                _forms_hint(mod_name),
            ) from exc
        raise DataError(
            f"--data {spec!r}: importing {mod_name!r} raised {src.one_line(exc)}",
            "fix the module",
        ) from exc
    except (Exception, SystemExit) as exc:  # noqa: BLE001
        raise DataError(
            f"--data {spec!r}: importing {mod_name!r} raised {src.one_line(exc)}",
            "fix the module",
        ) from exc


def _call_user_fn(spec: str, module: Any, fn_name: str) -> src.Splits:
    """Call ``module.fn()`` and check that it returned two datasets."""
    fn: Callable[[], Any] | None = getattr(module, fn_name, None)
    if not callable(fn):
        raise DataError(
            f"--data {spec!r}: no function {fn_name!r} in the module",
            "define fn() returning (train, val)",
        )
    try:
        result = fn()
    except (Exception, SystemExit) as exc:  # noqa: BLE001
        raise DataError(
            f"--data {spec!r}: {fn_name}() raised {src.one_line(exc)}",
            "fix the data function",
        ) from exc
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and all(map(_is_dataset, result))):
        raise DataError(
            f"--data {spec!r}: {fn_name}() returned {type(result).__name__}, "
            "not a (train, val) pair of datasets",
            "return two objects with __len__ and __getitem__ (e.g. torch Datasets)",
        )
    train, val = result
    desc = f"{spec}: user function, train {len(train)} / val {len(val)} as returned (no extra preprocessing)"
    return src.Splits(train, val, _num_classes(train), desc)


def _is_dataset(obj: Any) -> bool:
    """A map-style dataset: indexable and sized (strings and bytes excluded)."""
    if isinstance(obj, (str, bytes)):
        return False
    return hasattr(obj, "__getitem__") and hasattr(obj, "__len__")


def _num_classes(ds: Any) -> int | None:
    """``ds.num_classes`` or ``len(ds.classes)`` when the dataset exposes one."""
    n = getattr(ds, "num_classes", None)
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    classes = getattr(ds, "classes", None)
    return len(classes) if classes is not None and hasattr(classes, "__len__") else None


# ------------------------------------------------------------ utilities ---


def _check_nonempty(spec: str, splits: src.Splits) -> None:
    """Refuse empty splits early: they would only fail later, obscurely."""
    for split, ds in (("train", splits.train), ("val", splits.val)):
        if len(ds) == 0:
            raise DataError(
                f"--data {spec!r}: the {split} split is empty",
                "point the spec at data with examples",
            )


def _sample_shape(spec: str, train: Any) -> tuple[tuple[int, ...], str]:
    """Shape (no batch dim) and dtype name of the first training input (integers: token ids)."""
    try:
        example = train[0]
    except (Exception, SystemExit) as exc:  # noqa: BLE001
        raise DataError(
            f"--data {spec!r}: reading the first training example raised {src.one_line(exc)}",
            "fix the dataset",
        ) from exc
    if not isinstance(example, (tuple, list)) or len(example) < 2:
        raise DataError(
            f"--data {spec!r}: examples must be (input, target) pairs, got {type(example).__name__}",
            "return (x, y) from __getitem__",
        )
    x = example[0]
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise DataError(
            f"--data {spec!r}: inputs must be tensors, got {type(x).__name__}",
            "apply a ToTensor transform",
        )
    dtype = torch.as_tensor(x).dtype
    name = "int64" if not dtype.is_floating_point and dtype != torch.bool else "float32"
    return tuple(int(d) for d in x.shape), name


def _take_subset(train: Any, n: int, seed: int) -> Any:
    """The first ``n`` examples of a ``seed``-ed permutation of ``train``."""
    if n <= 0:
        raise DataError(
            f"subset must be a positive number of examples, got {n}",
            "pass --subset N with N >= 1",
        )
    idx = torch.from_numpy(np.random.default_rng(seed).permutation(len(train))[:n])
    if isinstance(train, TensorDataset):
        return TensorDataset(*(t[idx] for t in train.tensors))
    return Subset(train, idx.tolist())


def make_loaders(
    bundle: DataBundle, batch_size: int, workers: int = 0, seed: int = 0, distributed: bool = False,
    augment: str | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Train loader (shuffled, seeded) and val loader (in order).

    ``augment`` names an augmentation of :mod:`cgmq_cli.augment` for the
    training examples (the caller calls ``train.dataset.set_epoch(epoch)``).

    ``batch_size`` is the global batch. The train order is the same
    ``DistributedSampler`` permutation with one process or many (seeded by
    ``seed + epoch``; the caller calls ``train.sampler.set_epoch(epoch)``), and
    with ``distributed=True`` rank r takes every world-th example of it, so a
    global batch of a distributed run holds exactly the examples of the same
    batch of a single-process run. Validation is sharded the same way, without
    padding, so that summed counts give the exact accuracy.
    """
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, got {batch_size}", "pass --batch-size N with N >= 1")
    if workers < 0:
        raise DataError(f"workers must be >= 0, got {workers}", "pass --workers 0 or more")
    world, rank = 1, 0
    if distributed:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise DataError(
                "distributed loaders need an initialized torch.distributed process group",
                "launch with torchrun",
            )
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if batch_size % world:
        raise DataError(f"--batch-size {batch_size} is the global batch and must be divisible by the "
                        f"{world} processes", f"use a multiple of {world}")
    common: dict[str, Any] = {"batch_size": batch_size // world, "num_workers": workers}
    train_ds = bundle.train if augment is None else Augmented(bundle.train, augment, seed)
    train_s = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    val = bundle.val if world == 1 else Subset(bundle.val, range(rank, len(bundle.val), world))
    train = DataLoader(train_ds, sampler=train_s, **common)
    return train, DataLoader(val, shuffle=False, **common)


def calibration_batch(bundle: DataBundle, n: int = 256, seed: int = 0) -> torch.Tensor:
    """A fixed batch of ``n`` training inputs (fewer if train is smaller), stacked.

    The examples are a ``seed``-ed random sample rather than the first ``n`` so
    that quantizer ranges see a class-balanced batch even for sorted datasets.
    """
    if n <= 0:
        raise DataError(f"calibration batch size must be positive, got {n}", "pass a positive number")
    idx = np.random.default_rng(seed).permutation(len(bundle.train))[:n]
    if isinstance(bundle.train, TensorDataset):
        return bundle.train.tensors[0][torch.from_numpy(idx)].clone()
    return torch.stack([torch.as_tensor(bundle.train[int(i)][0]) for i in idx])
