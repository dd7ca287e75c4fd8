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
import tomllib
from pathlib import Path
from typing import Any, Mapping

import yaml

from cgmq_cli.errors import UsageError

PROJECT_KEYS = ("model", "arch", "data", "profile", "epochs", "lr", "batch_size", "subset", "seed", "device",
                "input_shape", "leaf", "out", "weight_bits", "act_bits", "budgets", "workers")
BUDGET_KEYS = ("bops", "rel_bops", "weight_bytes", "cost")


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
