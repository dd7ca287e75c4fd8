"""The one validation layer for flags, project settings and settings read back from a run.

Project settings live in ``cgmq.yaml`` or ``[tool.cgmq]`` in pyproject.toml and
are overridden by flags. So that the bare ``cgmq compress model.pt --budget-bops
1e8`` works in a configured project and in CI, every compress setting can come
from the project file; a flag given on the command line always wins. Keys (all
optional)::

    model, arch, data, profile, epochs, lr, batch_size, subset, seed, device,
    input_shape, leaf, out, weight_bits, act_bits, workers, augment,
    budgets: {bops, rel_bops, weight_bytes, cost}

Every value, wherever it comes from, passes :func:`check_setting`: numbers
within :data:`INT_RANGES` / :data:`FLOAT_RANGES` (numeric strings count, as
YAML 1.1 reads ``1e-3`` as a string; booleans and fractions where an integer is
due do not), strings where a string is due, ``4,8`` or ``[4, 8]`` for width
lists and ``1,1,8,8`` or ``[1, 1, 8, 8]`` for shapes. A bad value is one
UsageError line naming the flag or the file and key, the value (shortened and
escaped) and what is allowed. Trust is never a setting: only the
``--trust-checkpoint`` flag of the current command grants it.
"""

from __future__ import annotations

import difflib
import math
import re
import time
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from cgmq_cli.augment import CHOICES as AUGMENT_CHOICES
from cgmq_cli.budget import BUDGET_KEYS, Budget, BudgetValueError
from cgmq_cli.errors import CgmqError, UsageError
from cgmq_cli.profiles import VALID_BITS
from cgmq_cli.safe_load import read_yaml
from cgmq_cli.sanitize import cut, short

if TYPE_CHECKING:  # torch-heavy modules: imported where settings are built, not when the CLI starts
    from cgmq_cli.compress import CompressSettings
    from cgmq_cli.trainer import TrainConfig

PROJECT_KEYS = ("model", "arch", "data", "profile", "epochs", "lr", "batch_size", "subset", "seed", "device",
                "input_shape", "leaf", "out", "weight_bits", "act_bits", "budgets", "workers", "augment")
# The fine-tuning recipe's switches (TrainConfig fields of the same names); project-file keys.
RECIPE_KEYS = ("lr_schedule", "gate_weights", "recalibrate", "gate_eta_decay", "last_gate_fraction", "measured_fill",
               "measured_exchange", "epochs_per_round", "distill", "label_smoothing", "finish_table", "gate_share")
PROJECT_KEYS += RECIPE_KEYS

# Inclusive bounds. gate_steps 0 means "one pass over the data" (a gate epoch is one pass or at
# least gate_steps batches, whichever is longer).
INT_RANGES = {
    "epochs": (1, 10_000), "batch_size": (1, 65_536), "subset": (1, 1_000_000_000), "seed": (0, 2**32 - 1),
    "workers": (0, 256), "gate_steps": (0, 1_000_000), "probe_batches": (1, 10_000),
    "max_bad_batches": (1, 1_000_000), "rounds": (0, 10_000), "epochs_per_round": (1, 10_000),
}
FLOAT_RANGES = {"lr": (0.0, 10.0), "eta": (0.0, 100.0), "r": (0.0, 1000.0),
                "last_gate_fraction": (0.0, 1.0), "distill": (0.0, 100.0),
                "label_smoothing": (0.0, 0.99), "gate_share": (0.0, 1.0)}  # lower bound exclusive, except:
LOW_INCLUSIVE = frozenset({"distill", "label_smoothing"})  # 0 is allowed (off)
HINTS = {
    "epochs": "the default is 6 (gate and weight epochs alternate)", "batch_size": "the default is 64",
    "subset": "N training examples, N >= 1", "seed": "any integer from 0 to 4294967295; the default is 0",
    "workers": "0 (the default) loads data in the main process", "lr": "the default is 1e-3 (cosine decay)",
    "gate_steps": "the default is 300; 0 means one pass over the data",
    "distill": "0 turns distillation off; 1 weighs it like the task loss",
}
STRING_KEYS = ("model", "arch", "data", "profile", "out", "loss", "device", "finish", "lr_schedule", "finish_table",
               "augment")
FINISH = ("repair-fill", "constraint")
LR_SCHEDULES = ("cosine", "constant")
FINISH_TABLES = ("auto", "measured", "predicted")  # the finish's loss changes (TrainConfig.finish_table)
BOOL_KEYS = ("amp", "trust", "gate_weights", "recalibrate", "gate_eta_decay", "measured_fill", "measured_exchange")
DEVICE = re.compile(r"cpu|cuda(:\d{1,3})?|mps")
MAX_INPUT_ELEMENTS = 2**27  # one example input of at most 128 Mi elements (512 MiB of float32)
MAX_TEXT = 4096


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def _bad(where: str, value: Any, allowed: str, hint: str | None = None) -> UsageError:
    sep = " " if where.startswith("--") else " = "
    return UsageError(f"{where}{sep}{short(value)}: {allowed}", hint)


def check_int(value: Any, where: str, low: int, high: int, hint: str | None = None) -> int:
    """An integer in [low, high]; a numeric string counts, a boolean or fraction does not."""
    number = value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,30}\s*", value):
        number = int(value)
    if isinstance(number, float) and not isinstance(number, bool):
        raise _bad(where, value, f"must be a whole number from {low:,} to {high:,}",
                   "write it without a fraction" + (f"; {hint}" if hint else ""))
    if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
        raise _bad(where, value, f"must be an integer from {low:,} to {high:,}", hint)
    return number


def check_float(value: Any, where: str, low: float, high: float, hint: str | None = None, low_ok: bool = False) -> float:
    """A finite number in (low, high] (``low_ok``: [low, high]); numeric strings count (YAML reads ``1e-3`` as a string)."""
    least = f"at least {low:g}" if low_ok else f"greater than {low:g}"
    number: Any = value
    if isinstance(value, str) and len(value) <= 64:
        try:
            number = float(value)
        except ValueError:
            number = value
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise _bad(where, value, f"must be a number {least} and at most {high:g}", hint)
    number = float(number)
    if not math.isfinite(number) or not (low <= number if low_ok else low < number) or number > high:
        raise _bad(where, value, f"must be a finite number {least} and at most {high:g}", hint)
    return number


def check_text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(where, value, "must be a non-empty string", "quote it in YAML if it looks like a number or yes/no")
    if len(value) > MAX_TEXT or "\0" in value:
        raise _bad(where, value, f"must be a string of at most {MAX_TEXT} characters without NUL")
    return value


def parse_number(value: Any, what: str) -> float | None:
    """A positive, finite number from a flag or YAML (``1e8`` style strings included)."""
    if value is None:
        return None
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{what} {short(value)} is not a number", "write it like 1e8 or 250000") from None
    if not number > 0 or number == float("inf"):
        raise UsageError(f"{what} must be a positive finite number, got {short(value)}", "write it like 1e8 or 250000")
    return number


def parse_limit(value: Any, key: str, flag: str) -> float | None:
    """A limit on budget metric ``key`` from ``flag``: a positive finite number within the metric's bounds."""
    number = parse_number(value, flag)
    if number is not None:
        try:
            Budget(**{key: number})
        except BudgetValueError as exc:
            from cgmq_cli.metrics import METRICS

            raise UsageError(f"{flag} {number:g}: {exc.allowed}", f"{key} is {METRICS[key].help}") from None
    return number


def parse_threshold(value: float | None, flag: str, fraction_hint: bool = False,
                    unit: str = "accuracy is in percent") -> float | None:
    """An accuracy threshold in percent: within [0, 100]; with ``fraction_hint`` a value in (0, 1] is refused too."""
    if value is None:
        return None
    if not math.isfinite(value) or not 0 <= value <= 100:
        raise UsageError(f"{flag} {short(value)}: must be a percentage from 0 to 100", unit)
    if fraction_hint and 0 < value <= 1:
        raise UsageError(f"{flag} {value:g} looks like a fraction, but accuracy is in percent",
                         f"accuracy is in percent; did you mean {value * 100:g}?")
    return value


def parse_bits(value: Any, what: str) -> tuple[int, ...] | None:
    """``"2,4,8"``, ``[2, 4, 8]`` or a single ``8`` -> (2, 4, 8)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int) else value
    if not isinstance(items, (list, tuple)) or len(items) > 16:
        raise _bad(what, value, "expected widths like 2,4,8", "write 4,8 on the command line or [4, 8] in YAML")
    bits = []
    for item in items:
        if isinstance(item, bool) or not (isinstance(item, int) or (isinstance(item, str) and item.strip().isdigit())):
            raise _bad(what, value, "expected widths like 2,4,8", "write 4,8 on the command line or [4, 8] in YAML")
        bits.append(int(item))
        if bits[-1] not in VALID_BITS:
            raise _bad(what, value, f"{bits[-1]} is not a bit-width", "allowed widths are 2, 4, 8, 16, 32 (32 = float)")
    if not bits:
        raise UsageError(f"{what} is empty")
    return tuple(sorted(set(bits)))


def parse_shape(value: Any, what: str = "--input-shape") -> tuple[int, ...] | None:
    """``"1,3,224,224"`` or ``[1, 3, 224, 224]`` -> (1, 3, 224, 224): batch first, bounded size."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace("x", ",").split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = []
    dims: list[int] = []
    for part in parts:
        if isinstance(part, str) and re.fullmatch(r"\d{1,12}", part):
            part = int(part)
        if isinstance(part, bool) or not isinstance(part, int) or part <= 0:
            dims = []
            break
        dims.append(part)
    if len(dims) < 2 or len(dims) > 8:
        raise _bad(what, value, "expected 2 to 8 positive integers with the batch first",
                   "e.g. 1,3,224,224 on the command line or [1, 3, 224, 224] in YAML")
    check_elements(tuple(dims[1:]), what)
    return tuple(dims)


def check_elements(shape: tuple[int, ...], what: str) -> None:
    """One example of ``shape`` must hold at most MAX_INPUT_ELEMENTS values (cgmq allocates it)."""
    numel = math.prod(shape)
    if numel > MAX_INPUT_ELEMENTS:
        raise UsageError(f"{what}: one example of shape {'x'.join(map(str, shape))} has {numel:,} elements, "
                         f"more than the {MAX_INPUT_ELEMENTS:,} cgmq allocates",
                         "pass the real input shape of the model (batch first), e.g. 1,3,224,224")


def check_setting(key: str, value: Any, where: str) -> Any:
    """Validate and normalise one setting (see the module docstring); ``where`` names the flag or file key."""
    if key in INT_RANGES:
        return check_int(value, where, *INT_RANGES[key], HINTS.get(key))
    if key in FLOAT_RANGES:
        return check_float(value, where, *FLOAT_RANGES[key], HINTS.get(key), low_ok=key in LOW_INCLUSIVE)
    if key in ("weight_bits", "act_bits"):
        return parse_bits(value, where)
    if key == "input_shape":
        return parse_shape(value, where)
    if key == "leaf":
        leaves = [value] if isinstance(value, str) else value
        if not isinstance(leaves, (list, tuple)) or len(leaves) > 1000:
            raise _bad(where, value, "must be a module path or a list of them", "e.g. features.3")
        return tuple(check_text(v, where) for v in leaves)
    if key in STRING_KEYS:
        text = check_text(value, where)
        if key == "finish" and text not in FINISH:
            raise _bad(where, value, f"expected {' or '.join(FINISH)}", "the default is repair-fill")
        if key == "lr_schedule" and text not in LR_SCHEDULES:
            raise _bad(where, value, f"expected {' or '.join(LR_SCHEDULES)}", f"the default is {LR_SCHEDULES[0]}")
        if key == "finish_table" and text not in FINISH_TABLES:
            raise _bad(where, value, f"expected {', '.join(FINISH_TABLES)}", f"the default is {FINISH_TABLES[0]}")
        if key == "augment" and text not in AUGMENT_CHOICES:
            raise _bad(where, value, f"expected {', '.join(AUGMENT_CHOICES)}",
                       "the default is none; hflip flips a seeded half of the training images")
        if key == "device" and not DEVICE.fullmatch(text):
            raise _bad(where, value, "expected cpu, cuda, cuda:N or mps", "the default is cpu")
        return text
    if key in BOOL_KEYS:
        if not isinstance(value, bool):
            raise _bad(where, value, "must be true or false", "write true or false without quotes")
        return value
    return value


def _check_keys(found: Mapping[str, Any], known: tuple[str, ...], where: str, prefix: str = "") -> None:
    for key in found:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            raise UsageError(f"{where}: unknown setting `{prefix}{cut(key)}`"
                             + (f"; did you mean `{prefix}{close[0]}`?" if close else ""),
                             f"known settings: {', '.join(known)}")


def read_project(directory: Path | None = None) -> tuple[dict[str, Any], str | None]:
    """The project settings, validated, and where they came from (``cgmq.yaml`` first, then pyproject.toml)."""
    directory = directory or Path.cwd()
    yaml_path = directory / "cgmq.yaml"
    if yaml_path.exists() or yaml_path.is_symlink():  # a dangling link is an error, not "no project file"
        data = read_yaml(yaml_path, str(yaml_path), UsageError) or {}
        source = str(yaml_path)
    else:
        toml_path = directory / "pyproject.toml"
        if not toml_path.is_file():
            return {}, None
        try:
            data = tomllib.loads(toml_path.read_text()).get("tool", {}).get("cgmq", {})
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"{toml_path}: invalid TOML: {short(str(exc), 120)}") from None
        if not data:
            return {}, None
        source = f"{toml_path} [tool.cgmq]"
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    _check_keys(data, PROJECT_KEYS, source)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key == "budgets":
            if value is not None and not isinstance(value, dict):
                raise UsageError(f"{source}: `budgets` must be a mapping with keys {', '.join(BUDGET_KEYS)}")
            _check_keys(value or {}, BUDGET_KEYS, source, "budgets.")
            out[key] = {k: parse_number(v, f"{source}: budgets.{k}") for k, v in (value or {}).items()}
        elif value is not None:
            out[key] = check_setting(key, value, f"{source}: {key}")
    return out, source


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


def default_out(model: str, kind: str = "") -> str:
    """``runs/[KIND-]STEM-TIME`` for a model; the stem is cut so that the name fits any file system (255 bytes)."""
    stem = (Path(model.split(":")[-1]).stem or "model").encode()[:96].decode(errors="ignore") or "model"
    return str(Path("runs") / f"{kind}{'-' if kind else ''}{stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def _train_config(values: dict) -> "TrainConfig":
    from cgmq_cli.trainer import TrainConfig

    base = TrainConfig()
    recipe = {key: values[key] for key in RECIPE_KEYS if values.get(key) is not None}
    return TrainConfig(epochs=values.get("epochs", base.epochs), lr=values.get("lr", base.lr),
                       gate_steps=base.gate_steps if values.get("gate_steps") is None else values["gate_steps"],
                       finish=values.get("finish") or base.finish, device=values.get("device") or base.device, **recipe)


def resolve_compress(flags: dict, budget_flags: dict, project_file: bool = True) -> "CompressSettings":
    """CompressSettings from flags > project file > profile defaults > built-in defaults, all validated.

    ``project_file=False`` ignores cgmq.yaml / [tool.cgmq] (the Python API's default).
    """
    from cgmq_cli.compress import CompressSettings
    from cgmq_cli.profiles import load_profile
    from cgmq_cli.trainer import TrainConfig

    checked_flags = {k: (check_setting(k, v, flag_name(k)) if v is not None else None) for k, v in flags.items()}
    project, source = read_project() if project_file else ({}, None)
    values = merged(checked_flags, project, {"batch_size": 64, "workers": 0, "seed": 0, "epochs": TrainConfig.epochs,
                                            "augment": "none"})
    if not values.get("model"):
        raise UsageError("no model given", "pass MODEL (a file or torchvision:NAME), or set `model` in cgmq.yaml")
    if not values.get("data"):
        raise UsageError("no training data given", "pass --data SPEC (e.g. --data digits or --data fashion-mnist:DIR), "
                         "or set `data` in cgmq.yaml / [tool.cgmq]")
    try:
        profile = load_profile(values.get("profile"))
    except CgmqError as exc:
        if checked_flags.get("profile") is None and project.get("profile") is not None:  # name the file, not a flag
            raise type(exc)(f"{source}: profile: {exc.message}", exc.hint) from None
        raise
    device = str(values.get("device") or "cpu")
    if checked_flags.get("device") is None:  # from the project file: name it, not --device (compress checks flags)
        from cgmq_cli.distributed import missing_backend

        backend = missing_backend(device)
        if backend is not None:
            raise UsageError(f"{source}: device = {device}: {backend} is not available on this machine",
                             "set device: cpu there, or pass --device cpu")
    budgets = profile.default_budgets.as_dict()
    budgets.update({k: v for k, v in (project.get("budgets") or {}).items() if v is not None})
    budgets.update({k: v for k, v in budget_flags.items() if v is not None})
    try:
        budget = Budget(**{k: parse_number(v, f"budget {k}") for k, v in budgets.items()})
    except BudgetValueError as exc:
        raise UsageError(exc.message, exc.hint) from None
    if values.get("amp") and not str(values.get("device") or "cpu").startswith("cuda"):
        raise UsageError("--amp needs --device cuda", "drop --amp on CPU")
    if values.get("label_smoothing") and values.get("loss"):
        raise UsageError("label_smoothing applies to the built-in cross-entropy, not to --loss",
                         "smooth the targets inside your loss, or remove label_smoothing from the project file")
    return CompressSettings(
        model=values["model"], data=values["data"], out=values.get("out") or default_out(values["model"]),
        budget=budget, arch=values.get("arch"), trust=bool(checked_flags.get("trust")),
        leaves=tuple(values.get("leaf") or ()), input_shape=values.get("input_shape"), profile=values.get("profile"),
        weight_bits=values.get("weight_bits"), act_bits=values.get("act_bits"),
        subset=values.get("subset"), batch_size=values["batch_size"], workers=values["workers"],
        augment=values["augment"], seed=values["seed"], loss=values.get("loss"), amp=bool(values.get("amp")),
        train=_train_config(values))


_OPTIONAL = ("arch", "profile", "loss", "input_shape", "weight_bits", "act_bits", "subset", "rounds")
# Settings absent in runs of older cgmq versions, with the behaviour those runs had (a resume keeps it).
_NEWER = {"lr_schedule": "constant", "gate_weights": False, "recalibrate": False, "gate_eta_decay": False,
          "last_gate_fraction": 1.0, "measured_fill": False, "measured_exchange": False, "epochs_per_round": 3, "distill": 0.0,
          "label_smoothing": 0.0, "finish_table": "predicted", "gate_share": 1.0, "augment": "none"}


def from_config(d: Any, where: str) -> "CompressSettings":
    """The settings saved in a run's config.json, checked like flags; trust is never read from the file."""
    from cgmq_cli.compress import CompressSettings
    from cgmq_cli.trainer import TrainConfig

    settings_fields = tuple(f.name for f in fields(CompressSettings))
    train_fields = tuple(f.name for f in fields(TrainConfig))
    if not isinstance(d, dict):
        raise UsageError(f"{where}: settings must be a JSON object", "the run directory was damaged or edited")

    def check(mapping: dict, known: tuple[str, ...], prefix: str) -> dict:
        for key in mapping:
            if key not in known:
                raise UsageError(f"{where}: unknown setting `{prefix}{cut(key)}`",
                                 "the run directory was edited; compress again")
        out = {}
        for key in known:
            if key not in mapping:
                if key in _NEWER:
                    out[key] = _NEWER[key]
                if key in _OPTIONAL or key in _NEWER or key == "trust":
                    continue
                raise UsageError(f"{where}: lacks setting `{prefix}{key}`", "the run directory was damaged or edited")
            value = mapping[key]
            if value is None and key in _OPTIONAL:
                out[key] = None
                continue
            name = "leaf" if key == "leaves" else key
            out[key] = check_setting(name, value, f"{where}: {prefix}{key}")
        return out

    values = check(d, settings_fields, "settings.")
    budget = values.get("budget")
    if not isinstance(budget, dict):
        raise UsageError(f"{where}: settings.budget = {short(budget)}: must be a JSON object")
    _check_keys(budget, BUDGET_KEYS, where, "settings.budget.")
    try:
        values["budget"] = Budget(**budget)
    except BudgetValueError as exc:
        raise UsageError(f"{where}: settings.{exc.message}", "the run directory was edited; compress again") from None
    if not isinstance(values.get("train"), dict):
        raise UsageError(f"{where}: settings.train = {short(values.get('train'))}: must be a JSON object")
    values["train"] = TrainConfig(**check(values["train"], train_fields, "settings.train."))
    values["trust"] = False  # trust comes from the command line of each invocation, never from a file
    return CompressSettings(**values)
