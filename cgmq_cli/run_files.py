"""The files of a run directory, read and checked for shape before use (config.json, report.json, model.pt,
checkpoint.pt); a damaged or edited file is one error line, never a KeyError later.

The run directory's life (markers, locks, replacing, ``latest``) is :mod:`cgmq_cli.rundir`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from cgmq_cli import safe_load
from cgmq_cli.atomic import read_json
from cgmq_cli.errors import CheckpointError, UsageError
from cgmq_cli.rundir import MARKER, run_id
from cgmq_cli.sanitize import short
from cgmq_cli.sweep import is_sweep

SOURCE_KINDS = ("state_dict", "pt2", "torchvision", "pickle")  # config.json's source.kind


def _shape_error(path: Path, what: str) -> UsageError:
    return UsageError(f"{path} {what}; the run directory was damaged or edited",
                      "compress again, or restore the file")


def _expect(value: Any, kinds: tuple[type, ...] | type, path: Path, where: str) -> Any:
    bad = isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,))
    if bad or not isinstance(value, kinds):
        raise _shape_error(path, f"has {where} = {short(value)}")
    return value


CONFIG_KEYS = ("cgmq_version", "settings", "source", "sample_shape", "sample_dtype")
SOURCE_KEYS = ("model", "arch", "trusted", "sha256", "kind", "sample_shape")


def _refuse_sweep(run_dir: Path) -> None:
    """A sweep directory holds runs but is not one: say which to pass instead of "config.json is missing"."""
    if is_sweep(run_dir):
        runs = sorted(p.name for p in run_dir.iterdir() if not p.is_symlink() and (p / "report.json").is_file())
        raise UsageError(f"{run_dir} is a sweep, not one run",
                         f"pass one of its runs, e.g. {run_dir / runs[0]}" if runs else "pass one of its runs")


def read_config(run_dir: Path) -> dict:
    """config.json with its shape checked (settings are checked by :func:`cgmq_cli.settings.from_config`)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        _refuse_sweep(Path(run_dir))
    config = read_json(path)
    if not isinstance(config, dict):
        raise _shape_error(path, f"is a {type(config).__name__}, not a JSON object")
    for key in config:
        if key not in CONFIG_KEYS:
            raise _shape_error(path, f"has an unknown key {short(key)}")
    for key in ("settings", "source", "sample_shape"):
        if key not in config:
            raise _shape_error(path, f"lacks `{key}`")
    _expect(config["settings"], dict, path, "settings")
    source = _expect(config["source"], dict, path, "source")
    for key in source:
        if key not in SOURCE_KEYS:
            raise _shape_error(path, f"has an unknown key source.{short(key)}")
    if source.get("kind") not in SOURCE_KINDS:
        raise _shape_error(path, f"has source.kind = {short(source.get('kind'))}")
    _expect(source.get("model"), str, path, "source.model")
    for key in ("arch", "sha256"):
        _expect(source.get(key), (str, type(None)), path, f"source.{key}")
    shape = _expect(config["sample_shape"], list, path, "sample_shape")
    if not shape or len(shape) > 8 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 2**20
                                              for d in shape):
        raise _shape_error(path, f"has sample_shape = {short(shape)}")
    if config.get("sample_dtype", "float32") not in ("float32", "int64"):
        raise _shape_error(path, f"has sample_dtype = {short(config.get('sample_dtype'))}")
    return config


def _number(value: Any) -> bool:
    """A finite int or float (JSON from Python may hold NaN and Infinity, which no cost or accuracy can be)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_report(run_dir: Path) -> dict:
    """report.json with the fields every renderer and check reads present and well typed."""
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        _refuse_sweep(Path(run_dir))
        raise UsageError(f"{run_dir} has no report.json: the run did not finish",
                         f"resume it: cgmq compress --resume {run_dir}")
    report = read_json(path)
    if not isinstance(report, dict):
        raise _shape_error(path, f"is a {type(report).__name__}, not a JSON object")
    for key, kinds in (("cost", dict), ("budget", dict), ("accuracy", dict), ("layers", list), ("run", str),
                       ("feasible", bool), ("profile", str), ("data", str), ("model", dict), ("epochs", int),
                       ("seconds", (int, float))):
        if key not in report:
            raise _shape_error(path, f"lacks `{key}`")
        _expect(report[key], kinds, path, key)
    cost = report["cost"]
    for key in ("bops", "rel_bops", "weight_bytes", "macs"):
        if not _number(cost.get(key)):
            raise _shape_error(path, f"has cost.{key} = {short(cost.get(key))}")
    for key, limit in report["budget"].items():
        if limit is not None and (not _number(limit) or limit <= 0):
            raise _shape_error(path, f"has budget.{short(key)} = {short(limit)}")
        if limit is not None and not _number(cost.get(key)):
            raise _shape_error(path, f"has a budget {short(key)} but no cost.{short(key)}")
    for key in ("float", "quantized"):
        if not _number(report["accuracy"].get(key)):
            raise _shape_error(path, f"has accuracy.{key} = {short(report['accuracy'].get(key))}")
    for i, layer in enumerate(report["layers"]):
        if not isinstance(layer, dict) or not isinstance(layer.get("name"), str) or not isinstance(layer.get("op"), str) \
                or not all(_number(layer.get(k)) for k in ("macs", "params", "bits_w", "bits_a", "bops", "weight_bytes")):
            raise _shape_error(path, f"has a malformed layers[{i}]")
    return report


def read_torch_state(run_dir: Path, name: str, keys: Mapping[str, type | tuple[type, ...]]) -> dict:
    """``model.pt`` / ``checkpoint.pt``: weights-only, a dict with ``keys``, from this very run."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise UsageError(f"{run_dir} has no {name}")
    try:
        obj = safe_load.load_weights(path, str(path))
    except CheckpointError:
        raise CheckpointError(f"{path} is damaged (truncated or not written by cgmq)",
                              "compress again" if name == "model.pt" else "start the run again") from None
    if not isinstance(obj, dict) or any(not isinstance(obj.get(k), t) for k, t in keys.items()):
        raise CheckpointError(f"{path} is not a cgmq {name} (wrong contents)", "compress again")
    expected = run_id(run_dir)
    if expected and obj.get("run") not in (None, expected):
        raise CheckpointError(f"{path} belongs to another run (its run id differs from {MARKER})",
                              "restore this run's own file, or compress again")
    return obj
