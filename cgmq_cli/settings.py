"""Project settings: ``cgmq.yaml`` or ``[tool.cgmq]`` in pyproject.toml, overridden by flags.

So that the bare ``cgmq compress model.pt --budget-bops 1e8`` works in a
configured project and in CI, every compress setting can come from the
project file; a flag given on the command line always wins. Keys (all
optional)::

    model, arch, data, profile, epochs, lr, batch_size, subset, seed, device,
    input_shape, leaf, out, weight_bits, act_bits,
    budgets: {bops, rel_bops, weight_bytes, cost}
"""

from __future__ import annotations

import difflib
import time
import tomllib
from pathlib import Path
from typing import Any, Mapping

import yaml

from cgmq_cli import api
from cgmq_cli.budget import BUDGET_KEYS, Budget
from cgmq_cli.compress import CompressSettings
from cgmq_cli.errors import UsageError
from cgmq_cli.profiles import load_profile
from cgmq_cli.trainer import TrainConfig

PROJECT_KEYS = ("model", "arch", "data", "profile", "epochs", "lr", "batch_size", "subset", "seed", "device",
                "input_shape", "leaf", "out", "weight_bits", "act_bits", "budgets", "workers")


def _check_keys(found: Mapping[str, Any], known: tuple[str, ...], where: str, prefix: str = "") -> None:
    for key in found:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            raise UsageError(f"{where}: unknown setting `{prefix}{key}`" + (f"; did you mean `{prefix}{close[0]}`?" if close else ""),
                             f"known settings: {', '.join(known)}")


def read_project(directory: Path | None = None) -> tuple[dict[str, Any], str | None]:
    """The project settings and where they came from (``cgmq.yaml`` first, then pyproject.toml)."""
    directory = directory or Path.cwd()
    yaml_path = directory / "cgmq.yaml"
    if yaml_path.is_file():
        try:
            data = yaml.safe_load(yaml_path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UsageError(f"{yaml_path}: invalid YAML{where}", "fix the file or remove it") from None
        source = str(yaml_path)
    else:
        toml_path = directory / "pyproject.toml"
        if not toml_path.is_file():
            return {}, None
        try:
            data = tomllib.loads(toml_path.read_text()).get("tool", {}).get("cgmq", {})
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{toml_path}: invalid TOML: {exc}") from None
        if not data:
            return {}, None
        source = f"{toml_path} [tool.cgmq]"
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    _check_keys(data, PROJECT_KEYS, source)
    if "budgets" in data:
        if not isinstance(data["budgets"], dict):
            raise UsageError(f"{source}: `budgets` must be a mapping with keys {', '.join(BUDGET_KEYS)}")
        _check_keys(data["budgets"], BUDGET_KEYS, source, "budgets.")
    return data, source


def merged(flags: Mapping[str, Any], project: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """flag (when not None) > project file > built-in default, key by key."""
    out = dict(defaults)
    for key, value in project.items():
        if key != "budgets":
            out[key] = value
    for key, value in flags.items():
        if value is not None and value != () and value != []:
            out[key] = value
    return out


def parse_number(value: Any, what: str) -> float | None:
    """A positive, finite number from a flag or YAML (``1e8`` style strings included)."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} {value!r} is not a number", "write it like 1e8 or 250000") from None
    if not number > 0 or number == float("inf"):
        raise UsageError(f"{what} must be a positive finite number, got {value!r}")
    return number


def parse_bits(value: Any, what: str) -> tuple[int, ...] | None:
    """``"2,4,8"`` or ``[2, 4, 8]`` -> (2, 4, 8)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        bits = tuple(sorted({int(str(b).strip()) for b in items}))
    except ValueError:
        raise UsageError(f"{what} {value!r}: expected widths like 2,4,8") from None
    if not bits:
        raise UsageError(f"{what} is empty")
    return bits


def _default_out(model: str) -> str:
    stem = Path(model.split(":")[-1]).stem or "model"
    return str(Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def _train_config(values: dict) -> TrainConfig:
    base = TrainConfig()
    return TrainConfig(epochs=int(values.get("epochs", base.epochs)), lr=float(values.get("lr", base.lr)),
                       eta=values.get("eta") or base.eta, r=values.get("r") or base.r,
                       gate_steps=values.get("gate_steps") or base.gate_steps,
                       finish=values.get("finish") or base.finish, device=values.get("device") or base.device)


def resolve_compress(flags: dict, budget_flags: dict) -> "CompressSettings":
    """CompressSettings from flags > project file > profile defaults > built-in defaults."""
    project, _ = read_project()
    values = merged(flags, project, {"batch_size": 64, "workers": 0, "seed": 0, "epochs": TrainConfig.epochs})
    if not values.get("model"):
        raise UsageError("no model given", "pass MODEL (a file or torchvision:NAME), or set `model` in cgmq.yaml")
    if not values.get("data"):
        raise UsageError("no training data given", "pass --data SPEC (e.g. --data digits or --data fashion-mnist:DIR), "
                         "or set `data` in cgmq.yaml / [tool.cgmq]")
    profile = load_profile(values.get("profile"))
    budgets = profile.default_budgets.as_dict()
    budgets.update({k: v for k, v in (project.get("budgets") or {}).items() if v is not None})
    budgets.update({k: v for k, v in budget_flags.items() if v is not None})
    budget = Budget(**{k: parse_number(v, f"budget {k}") for k, v in budgets.items()})
    for key in ("epochs", "batch_size"):
        if int(values[key]) <= 0:
            raise UsageError(f"--{key.replace('_', '-')} must be a positive integer, got {values[key]}")
    if values.get("amp") and not str(values.get("device") or "cpu").startswith("cuda"):
        raise UsageError("--amp needs --device cuda", "drop --amp on CPU")
    leaves = values.get("leaf") or ()
    return CompressSettings(
        model=values["model"], data=values["data"], out=values.get("out") or _default_out(values["model"]),
        budget=budget, arch=values.get("arch"), trust=bool(values.get("trust")),
        leaves=tuple([leaves] if isinstance(leaves, str) else leaves),
        input_shape=api.parse_shape(values.get("input_shape")), profile=values.get("profile"),
        weight_bits=parse_bits(values.get("weight_bits"), "--weight-bits"),
        act_bits=parse_bits(values.get("act_bits"), "--act-bits"),
        subset=values.get("subset"), batch_size=int(values["batch_size"]), workers=int(values["workers"]),
        seed=int(values["seed"]), loss=values.get("loss"), amp=bool(values.get("amp")), train=_train_config(values))
