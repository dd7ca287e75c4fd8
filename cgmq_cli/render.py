"""Terminal output: Rich tables on a terminal, plain text otherwise, JSON on stdout.

No colour or progress bars when stdout is not a terminal or NO_COLOR is set
(Rich honours both). Logs and errors go to stderr so that ``--json`` output on
stdout stays one clean JSON object.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable

from rich.console import Console
from rich.table import Table


def stdout() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def stderr() -> Console:
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def error(message: str, hint: str | None = None) -> None:
    """``error: ...`` and an optional ``hint: ...`` on stderr, no markup interpretation."""
    sys.stderr.write(f"error: {message}\n")
    if hint:
        sys.stderr.write(f"hint: {hint}\n")


def info(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def json_out(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def human(n: float) -> str:
    """1814073344 -> '1.81G'."""
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.2f}"


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]], right: Iterable[str] = ()) -> Table:
    right = set(right)
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col, justify="right" if col in right else "left")
    for row in rows:
        t.add_row(*[str(c) for c in row])
    return t


def inspect_table(result: Any) -> None:
    total = result.totals["macs"] or 1
    rows = [(l["name"], l["op"], f"{l['macs']:,}", f"{l['params']:,}", f"{100 * l['macs'] / total:.1f}%")
            for l in result.layers]
    rows.append(("total", "", f"{result.totals['macs']:,}", f"{result.totals['params']:,}", "100.0%"))
    console = stdout()
    console.print(table(f"{result.model}  input 1x{'x'.join(map(str, result.sample_shape))}",
                        ("layer", "op", "MACs", "params", "share"), rows, right=("MACs", "params", "share")))
    console.print(f"{len(result.layers)} quantizable layers, {human(result.totals['macs'])} MACs, "
                  f"float BOPs (32x32) {human(result.totals['bops_fp32'])}")


def profiles_table(rows: list[dict]) -> None:
    stdout().print(table("hardware profiles (presets/)", ("name", "weights", "activations", "input", "cost", "description"),
                         [(r["name"], ",".join(map(str, r["weight_bits"])), ",".join(map(str, r["act_bits"])),
                           r["input_bits"], r["cost"], r["description"]) for r in rows]))
