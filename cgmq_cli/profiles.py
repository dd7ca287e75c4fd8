"""Hardware profiles: what a target allows, as versioned YAML data validated on load.

A profile lists the bit-widths a target runs for weights and activations (a
default set, then per op kind, then per layer through ordered overrides), how
weights are scaled, how activations are signed, what one MAC costs at each
(b_w, b_a) pair and default budgets. Command-line flags may only narrow it
(:meth:`HardwareProfile.narrowed`): a request outside the profile is an error.

Every problem is one :class:`ProfileError` line naming the source (file or
``preset:NAME``), the key path as written in the YAML, the bad value and what is
allowed, e.g. ``my.yaml: per_op.conv.weight_bits[1] = 3: allowed widths are ...``.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from cgmq_cli.budget import BUDGET_KEYS, Budget, BudgetValueError
from cgmq_cli.errors import ProfileError
from cgmq_cli.opnames import INTEGER_OPS, PROFILE_ALIASES, PROFILE_KINDS
from cgmq_cli.safe_load import read_yaml
from cgmq_cli.sanitize import cut as _cut, short

Budgets = Budget  # a profile's default budgets

SCHEMA_VERSION = 1
VALID_BITS = (2, 4, 8, 16, 32)  # 32 = not quantized (float)
OP_KINDS = PROFILE_KINDS
OP_ALIASES = PROFILE_ALIASES
GRANULARITIES = ("per-channel", "per-tensor")
SIGNEDNESS = ("auto", "unsigned", "signed", "asymmetric")
DEFAULT_PRESET = "generic"
WEIGHT_FLAG, ACT_FLAG = "--weight-bits", "--act-bits"
TOP_KEYS = ("schema_version", "name", "description", "weight_bits", "act_bits", "weight_granularity",
            "act_signedness", "input_bits", "integer_ops", "reduce_range", "per_op", "overrides", "cost", "budgets")
PAIR_KEYS = ("weight_bits", "act_bits")
_ALLOWED_BITS = "allowed widths are 2, 4, 8, 16, 32 (32 = float)"
_PACKAGE_DIR = Path(__file__).resolve().parent

Bits = tuple[int, ...]


class _FieldError(ProfileError):
    """A ProfileError that remembers its key path, so a parent can re-anchor it (``budgets.`` + path)."""

    def __init__(self, where: str, path: str, value: Any, allowed: str, hint: str | None = None) -> None:
        super().__init__(f"{where}: {path} = {short(value)}: {allowed}", hint)
        self.path, self.value, self.allowed = path, value, allowed

    def within(self, where: str, prefix: str) -> _FieldError:
        path = f"{prefix}.{self.path}" if self.path else prefix
        return _FieldError(where, path, self.value, self.allowed, self.hint)


def _fmt(bits: Sequence[int]) -> str:
    return ", ".join(str(b) for b in bits)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _guess(word: Any, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word)[:100], known, n=1)
    return f"; did you mean `{close[0]}`?" if close else ""


def _widths(value: Any, where: str, path: str) -> Bits:
    """A non-empty list of distinct valid widths, returned sorted ascending."""
    if not isinstance(value, (list, tuple)):
        raise _FieldError(where, path, value, "must be a list of widths such as [4, 8]")
    if not value:
        raise _FieldError(where, path, value, f"an empty list allows nothing; {_ALLOWED_BITS}")
    for i, bits in enumerate(value):
        if not _is_int(bits) or bits not in VALID_BITS:
            raise _FieldError(where, f"{path}[{i}]", bits, _ALLOWED_BITS)
    if len(set(value)) != len(value):
        raise _FieldError(where, path, value, "lists a width twice")
    return tuple(sorted(value))


def _choice(value: Any, choices: Sequence[str], where: str, path: str) -> None:
    if value not in choices:
        hint = "YAML reads yes/no/on/off as booleans: quote the value" if isinstance(value, bool) else None
        raise _FieldError(where, path, value, f"must be one of {', '.join(choices)}{_guess(value, choices)}", hint)


def _positive(value: Any, where: str, path: str, upper: float = math.inf) -> float:
    """A positive finite number; numeric strings count, as YAML 1.1 reads ``1e8`` as a string."""
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 < number <= upper \
            or not math.isfinite(number):
        limit = "" if upper == math.inf else f" and at most {upper:g}"
        raise _FieldError(where, path, value, f"must be a positive finite number{limit}")
    return float(number)


def _check_pair(obj: OpWidths | Override, where: str) -> None:
    """Normalise the optional weight_bits/act_bits of a per-op entry or override; one must be set."""
    for key in PAIR_KEYS:
        if getattr(obj, key) is not None:
            object.__setattr__(obj, key, _widths(getattr(obj, key), where, key))
    if obj.weight_bits is None and obj.act_bits is None:
        given = {k: v for k, v in vars(obj).items() if v is not None}
        raise _FieldError(where, "", given, "sets neither weight_bits nor act_bits")


@dataclass(frozen=True)
class OpWidths:
    """Widths allowed for one op kind; None keeps the profile's default for that tensor."""

    weight_bits: Bits | None = None
    act_bits: Bits | None = None

    def __post_init__(self) -> None:
        _check_pair(self, "OpWidths")


@dataclass(frozen=True)
class Override:
    """Widths for the layers ``match`` selects: "first", "last" or an fnmatch glob on the layer name."""

    match: str
    weight_bits: Bits | None = None
    act_bits: Bits | None = None

    def __post_init__(self) -> None:
        value = self.match
        if not isinstance(value, str) or not value.strip() or value != value.strip():
            raise _FieldError("Override", "match", value, 'must be "first", "last" or a glob such as "features.*"')
        if value.lower() in ("first", "last") and value not in ("first", "last"):
            raise _FieldError("Override", "match", value, f"keywords are lower case: `{value.lower()}`")
        _check_pair(self, "Override")

    def matches(self, layer_name: str, index: int, n_layers: int) -> bool:
        """Whether this override applies to the quantized layer at ``index`` (graph order)."""
        if self.match in ("first", "last"):
            return index == (0 if self.match == "first" else n_layers - 1)
        return fnmatch.fnmatchcase(layer_name, self.match)


@dataclass(frozen=True)
class HardwareProfile:
    """What one target allows; validated on construction (see the module docstring)."""

    name: str
    description: str = ""
    schema_version: int = SCHEMA_VERSION
    weight_bits: Bits = VALID_BITS
    act_bits: Bits = VALID_BITS
    per_op: Mapping[str, OpWidths] = field(default_factory=dict)
    overrides: tuple[Override, ...] = ()
    input_bits: int = 8
    weight_granularity: str = "per-channel"
    act_signedness: str = "auto"
    integer_ops: tuple[str, ...] = ()  # what the target runs as integer kernels (see INTEGER_OPS)
    reduce_range: bool = False  # 8-bit weights use the codes [-64, 63] (x86 without VNNI)
    cost_table: Mapping[tuple[int, int], float] | None = None
    cost_unit: str = "BOPs"
    default_budgets: Budgets = field(default_factory=Budgets)
    source: str = "<python>"

    def __post_init__(self) -> None:
        src = str(self.source)
        _check_schema(self.schema_version, src)
        for key in ("name", "description", "cost_unit"):
            if not isinstance(getattr(self, key), str) or (key == "name" and not self.name.strip()):
                raise _FieldError(src, key.replace("cost_", "cost."), getattr(self, key), "must be a (non-empty) string")
        for key in PAIR_KEYS:
            object.__setattr__(self, key, _widths(getattr(self, key), src, key))
        if not _is_int(self.input_bits) or self.input_bits not in VALID_BITS:
            raise _FieldError(src, "input_bits", self.input_bits, _ALLOWED_BITS)
        _choice(self.weight_granularity, GRANULARITIES, src, "weight_granularity")
        _choice(self.act_signedness, SIGNEDNESS, src, "act_signedness")
        self._check_integer(src)
        self._check_parts(src)
        if self.cost_table is not None:
            object.__setattr__(self, "cost_table", MappingProxyType(_check_table(self.cost_table, src)))
            _check_coverage(self.cost_table, self._reachable_pairs(), src)

    def _check_integer(self, src: str) -> None:
        if not isinstance(self.integer_ops, (list, tuple)):
            raise _FieldError(src, "integer_ops", self.integer_ops, f"must be a list of {', '.join(INTEGER_OPS)}")
        for i, name in enumerate(self.integer_ops):
            _choice(name, INTEGER_OPS, src, f"integer_ops[{i}]")
        if len(set(self.integer_ops)) != len(self.integer_ops):
            raise _FieldError(src, "integer_ops", list(self.integer_ops), "lists an op twice")
        object.__setattr__(self, "integer_ops", tuple(self.integer_ops))
        if not isinstance(self.reduce_range, bool):
            raise _FieldError(src, "reduce_range", self.reduce_range, "must be true or false")
        if self.integer_ops and self.integer_width is None:
            raise _FieldError(src, "integer_ops", list(self.integer_ops),
                              "integer kernels need an activation width below 32 in act_bits")

    @property
    def integer_width(self) -> int | None:
        """The width of integer kernels' operands: the widest activation width below 32."""
        below = [b for b in self.act_bits if b < 32]
        return max(below) if below else None

    def _check_parts(self, src: str) -> None:
        """Type-check the nested parts (each validated itself) and freeze their containers."""
        if not isinstance(self.per_op, Mapping):
            raise _FieldError(src, "per_op", self.per_op, f"must map op kinds ({', '.join(OP_KINDS)}) to OpWidths")
        for kind, widths in self.per_op.items():
            _choice(kind, OP_KINDS, src, "per_op")
            if not isinstance(widths, OpWidths):
                raise _FieldError(src, f"per_op.{kind}", widths, "must be an OpWidths")
        if not isinstance(self.overrides, (list, tuple)) or not all(isinstance(o, Override) for o in self.overrides):
            raise _FieldError(src, "overrides", self.overrides, "must be a sequence of Override")
        if not isinstance(self.default_budgets, Budgets):
            raise _FieldError(src, "budgets", self.default_budgets, "must be a Budgets")
        object.__setattr__(self, "per_op", MappingProxyType(dict(self.per_op)))
        object.__setattr__(self, "overrides", tuple(self.overrides))

    def __reduce__(self) -> tuple:
        """Pickle and deep-copy through the constructor (a mappingproxy cannot be pickled)."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        table = None if self.cost_table is None else dict(self.cost_table)
        return _rebuild, ({**state, "per_op": dict(self.per_op), "cost_table": table},)

    def widths_for(self, layer_name: str, op_kind: str, index: int, n_layers: int) -> tuple[Bits, Bits]:
        """Allowed (weight widths, activation widths) of one quantized layer.

        Defaults first, then the entry for its op kind, then every matching
        override in order (later ones win); "first"/"last" are index 0 and
        ``n_layers - 1`` in the graph order of the quantized layers.
        """
        kind = OP_ALIASES.get(op_kind, op_kind)
        if kind not in OP_KINDS:
            raise ProfileError(f"unknown op kind {short(op_kind)}; profiles know {', '.join(OP_KINDS)}")
        if not 0 <= index < n_layers:
            raise ValueError(f"layer index {index} outside 0..{n_layers - 1}")
        weights, acts = self.weight_bits, self.act_bits
        entry = self.per_op.get(kind)
        parts = ([entry] if entry else []) + [o for o in self.overrides if o.matches(layer_name, index, n_layers)]
        for part in parts:
            weights, acts = part.weight_bits or weights, part.act_bits or acts
        return weights, acts

    def mac_cost(self, bw: int, ba: int) -> float:
        """Cost of one MAC at (b_w, b_a): ``bw * ba`` bit operations, or the cost-table entry."""
        if self.cost_table is None:
            return float(bw * ba)
        if (bw, ba) not in self.cost_table:
            entries = ", ".join(f"{w}x{a}" for w, a in sorted(self.cost_table))
            raise ProfileError(f"{self.source}: cost.table has no entry {bw}x{ba} (weight x activation bits)",
                               f"entries: {entries}")
        return self.cost_table[(bw, ba)]

    def narrowed(self, weight_bits: Sequence[int] | None = None,
                 act_bits: Sequence[int] | None = None) -> HardwareProfile:
        """This profile with every allowed set intersected with the flags' sets.

        Flags may only narrow: a width the profile never allows, or a set that
        becomes empty anywhere (defaults, per_op, overrides), is a ProfileError.
        """
        profile = self
        for key, flag, values in (("weight_bits", WEIGHT_FLAG, weight_bits), ("act_bits", ACT_FLAG, act_bits)):
            profile = profile if values is None else profile._narrow(key, flag, values)
        return profile

    def _narrow(self, key: str, flag: str, values: Sequence[int]) -> HardwareProfile:
        wanted = _flag_widths(flag, values)
        allowed = self._all_widths(key)
        extra = [b for b in wanted if b not in allowed]
        if extra:
            raise ProfileError(f"{flag} {_fmt(extra)}: profile {self.name} never allows {_fmt(extra)}; "
                               f"it allows {_fmt(allowed)}", "flags can only narrow what the profile allows")

        def cut(bits: Bits | None, where: str) -> Bits | None:
            kept = None if bits is None else tuple(b for b in bits if b in wanted)
            if kept == ():
                raise ProfileError(f"{flag} {_fmt(wanted)} leaves no width for {where}: profile {self.name} "
                                   f"allows only {_fmt(bits or ())} there", "add one of those widths to the flag")
            return kept

        per_op = {k: replace(v, **{key: cut(getattr(v, key), f"{k} layers")}) for k, v in self.per_op.items()}
        overrides = [replace(o, **{key: cut(getattr(o, key), f"layers matching `{o.match}`")})
                     for o in self.overrides]
        return replace(self, per_op=per_op, overrides=tuple(overrides), **{key: cut(getattr(self, key), "defaults")})

    def _all_widths(self, key: str) -> Bits:
        """Every width this profile allows anywhere for one tensor kind (weights or activations)."""
        sets = [getattr(self, key)] + [getattr(p, key) for p in (*self.per_op.values(), *self.overrides)]
        return tuple(sorted({b for s in sets if s for b in s}))

    def _reachable_pairs(self) -> set[tuple[int, int]]:
        """Every (b_w, b_a) some layer can get, assuming any subset of the overrides can match it."""
        default = (self.weight_bits, self.act_bits)
        states = {(p.weight_bits or default[0], p.act_bits or default[1]) for p in self.per_op.values()}
        if len(self.per_op) < len(OP_KINDS):
            states.add(default)
        for o in self.overrides:
            states |= {(o.weight_bits or w, o.act_bits or a) for w, a in states}
        return {(bw, ba) for ws, acts in states for bw in ws for ba in acts}


def _rebuild(state: dict[str, Any]) -> HardwareProfile:
    return HardwareProfile(**state)


def _check_schema(value: Any, where: str) -> None:
    if not _is_int(value) or value != SCHEMA_VERSION:
        raise _FieldError(where, "schema_version", value, f"this cgmq reads schema_version {SCHEMA_VERSION} only")


def _flag_widths(flag: str, values: Sequence[int]) -> Bits:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ProfileError(f"{flag} {short(values)}: give at least one width", _ALLOWED_BITS)
    for bits in values:
        if not _is_int(bits) or bits not in VALID_BITS:
            raise ProfileError(f"{flag} {short(bits)}: not a bit-width; {_ALLOWED_BITS}")
    return tuple(sorted(set(values)))


def _check_table(table: Any, src: str) -> dict[tuple[int, int], float]:
    """Positive finite (b_w, b_a) -> cost entries that never reward a wider width.

    cost.extreme_cost relies on the last point: the all-narrowest assignment is
    then the cheapest, so it decides whether a budget is feasible.
    """
    if not isinstance(table, Mapping) or not table:
        raise _FieldError(src, "cost.table", table, 'must map "WxA" width pairs to costs, e.g. {"8x8": 1.0}')
    checked = {}
    for key, cost in table.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(_is_int(b) and b in VALID_BITS for b in key)):
            raise _FieldError(src, "cost.table", key, f"keys are (weight bits, activation bits); {_ALLOWED_BITS}")
        checked[key] = _positive(cost, src, f"cost.table.{key[0]}x{key[1]}")
    for (w, a), cost in checked.items():  # every entry that is at least as wide in both operands (not only 2x)
        for wider in sorted(k for k in checked if k[0] >= w and k[1] >= a):
            if checked[wider] < cost:
                raise _FieldError(src, f"cost.table.{w}x{a}", cost, f"costs more than the wider "
                                  f"{wider[0]}x{wider[1]} = {checked[wider]:g}; wider widths must not be cheaper")
    return checked


def _check_coverage(table: Mapping[tuple[int, int], float], pairs: set[tuple[int, int]], src: str) -> None:
    missing = ", ".join(f"{w}x{a}" for w, a in sorted(pairs - set(table)))
    if missing:
        needed = ", ".join(f"{w}x{a}" for w, a in sorted(pairs))
        raise _FieldError(src, "cost.table", missing, f"missing; the table needs every (weight x activation) "
                          f"width pair the profile allows: {needed}")


# --- YAML -> HardwareProfile ------------------------------------------------------------------


def _mapping(value: Any, where: str, path: str, known: Sequence[str]) -> dict:
    """A YAML mapping whose keys are all known (null counts as empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _FieldError(where, path, value, f"must be a mapping with keys {', '.join(known)}")
    for key in value:
        if key not in known:
            full = _cut(f"{path}.{key}" if path else str(key))
            raise ProfileError(f"{where}: unknown key `{full}`{_guess(key, known)}",
                               f"known keys{' under ' + path if path else ''}: {', '.join(known)}")
    return value


def _build(cls: type, where: str, path: str, **kwargs: Any) -> Any:
    """Construct a nested part, re-anchoring its validation error at ``where: path``."""
    try:
        return cls(**kwargs)
    except _FieldError as exc:
        raise exc.within(where, path) from None
    except BudgetValueError as exc:
        raise _FieldError(where, f"{path}.{exc.key}", exc.value, exc.allowed) from None


def _parse_cost(value: Any, where: str) -> tuple[dict[tuple[int, int], Any] | None, str]:
    """``{metric: bops}`` (the default) or ``{metric: table, unit: cycles, table: {"8x8": 1.0, ...}}``."""
    data = _mapping(value, where, "cost", ("metric", "unit", "table"))
    _choice(data.get("metric", "bops"), ("bops", "table"), where, "cost.metric")
    if data.get("metric", "bops") == "bops":
        for key in ("unit", "table"):
            if key in data:
                raise _FieldError(where, f"cost.{key}", data[key], "only used with `metric: table`")
        return None, "BOPs"
    if not isinstance(data.get("unit"), str) or not data["unit"].strip():
        raise _FieldError(where, "cost.unit", data.get("unit"), "name the unit of the table entries, e.g. cycles")
    table = data.get("table")
    if not isinstance(table, dict) or not table:
        raise _FieldError(where, "cost.table", table, 'must map "WxA" width pairs to costs, e.g. {"8x8": 1.0}')
    parsed = {}
    for key, cost in table.items():
        found = re.fullmatch(r"(\d+)x(\d+)", str(key))
        if not found or not {int(found[1]), int(found[2])} <= set(VALID_BITS):
            raise _FieldError(where, f"cost.table.{key}", key, f'keys are "WxA" such as "4x8"; {_ALLOWED_BITS}')
        parsed[(int(found[1]), int(found[2]))] = cost
    return parsed, data["unit"]


def parse_profile(data: Any, source: str) -> HardwareProfile:
    """Build a validated profile from already-loaded YAML; ``source`` names it in every error."""
    if not isinstance(data, dict):
        raise _FieldError(source, "<document>", data, "a profile is a YAML mapping with `schema_version: 1`")
    if "schema_version" not in data:
        raise ProfileError(f"{source}: missing key `schema_version`", f"add `schema_version: {SCHEMA_VERSION}`")
    _check_schema(data["schema_version"], source)  # before key checks: a newer schema may add keys
    _mapping(data, source, "", TOP_KEYS)
    for key in PAIR_KEYS:
        if key not in data:
            raise ProfileError(f"{source}: missing key `{key}`", f"add e.g. `{key}: [4, 8]`")
    per_op = {k: _build(OpWidths, source, f"per_op.{k}", **_mapping(v, source, f"per_op.{k}", PAIR_KEYS))
              for k, v in _mapping(data.get("per_op"), source, "per_op", OP_KINDS).items()}
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list):
        raise _FieldError(source, "overrides", overrides, "must be a list such as [{match: last, weight_bits: [8]}]")
    overrides = [_build(Override, source, f"overrides[{i}]", **{"match": None, **_mapping(
        item, source, f"overrides[{i}]", ("match", *PAIR_KEYS))}) for i, item in enumerate(overrides)]
    budgets = _build(Budgets, source, "budgets", **_mapping(data.get("budgets"), source, "budgets", BUDGET_KEYS))
    table, unit = _parse_cost(data.get("cost"), source)
    plain = {k: data[k] for k in TOP_KEYS if k in data and k not in ("per_op", "overrides", "cost", "budgets")}
    plain.setdefault("name", source.removeprefix("preset:") if source.startswith("preset:") else Path(source).stem)
    return HardwareProfile(**plain, per_op=per_op, overrides=tuple(overrides), cost_table=table, cost_unit=unit,
                           default_budgets=budgets, source=source)


def _read_yaml(path: Path, source: str) -> Any:
    """A profile file, read within the bounds of :mod:`cgmq_cli.safe_load` (size, aliases, nesting)."""
    if not path.exists() and not path.is_symlink():
        raise ProfileError(f"{source}: profile file not found", "pass a preset name or a path to a YAML file")
    return read_yaml(path, source, ProfileError)


def presets_dir() -> Path:
    """``<repo>/presets`` in a source checkout (editable install); else ``cgmq_cli/presets``,
    where pyproject.toml ships the same files as package data in a wheel."""
    repo = _PACKAGE_DIR.parent
    if (repo / "pyproject.toml").is_file() and (repo / "presets").is_dir():
        return repo / "presets"
    return _PACKAGE_DIR / "presets"


def preset_names() -> list[str]:
    """Names of the bundled presets, sorted."""
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def _load_preset(name: str) -> HardwareProfile:
    names = preset_names()
    if name not in names:
        raise ProfileError(f"unknown profile `{_cut(name)}`; presets: {', '.join(names) or 'none'}{_guess(name, names)}",
                           "pass a preset name or a path to a profile YAML file, e.g. ./my-target.yaml")
    source = f"preset:{name}"
    profile = parse_profile(_read_yaml(presets_dir() / f"{name}.yaml", source), source)
    if profile.name != name:
        raise _FieldError(source, "name", profile.name, f"a preset's name must be its file name `{name}`")
    return profile


def load_profile(spec: str | None) -> HardwareProfile:
    """A preset by name (None: "generic"), or a YAML file when ``spec`` looks like a path."""
    spec = DEFAULT_PRESET if spec is None else spec
    if any(s and s in spec for s in ("/", os.sep, os.altsep)) or spec.endswith((".yaml", ".yml")):
        return parse_profile(_read_yaml(Path(spec).expanduser(), spec), spec)
    return _load_preset(spec)


def list_presets() -> list[HardwareProfile]:
    """Every bundled preset, loaded and validated, sorted by name."""
    return [_load_preset(name) for name in preset_names()]


def dump_profile(profile: HardwareProfile) -> dict[str, Any]:
    """The profile as plain YAML data; ``parse_profile(dump_profile(p), src)`` rebuilds it."""
    pair = lambda obj: {k: list(getattr(obj, k)) for k in PAIR_KEYS if getattr(obj, k) is not None}  # noqa: E731
    cost: dict[str, Any] = {"metric": "bops"}
    if profile.cost_table is not None:
        cost = {"metric": "table", "unit": profile.cost_unit,
                "table": {f"{bw}x{ba}": value for (bw, ba), value in profile.cost_table.items()}}
    return {
        "schema_version": profile.schema_version, "name": profile.name, "description": profile.description,
        "weight_bits": list(profile.weight_bits), "act_bits": list(profile.act_bits),
        "weight_granularity": profile.weight_granularity, "act_signedness": profile.act_signedness,
        "input_bits": profile.input_bits,
        "integer_ops": list(profile.integer_ops), "reduce_range": profile.reduce_range,
        "per_op": {k: pair(v) for k, v in profile.per_op.items()},
        "overrides": [{"match": o.match, **pair(o)} for o in profile.overrides],
        "cost": cost,
        "budgets": {k: getattr(profile.default_budgets, k) for k in BUDGET_KEYS},
    }
