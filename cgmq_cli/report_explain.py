"""``cgmq report --explain``: report.json's ``tensors`` -> why each width is what it is (table, Markdown, CSV).

Per quantizer: its width and allowed widths, the loss change the probes
predict (to second order) for one step up and one step down, what that step costs in each
budgeted metric, and the budget that stopped a raise. Works on the plain
report dictionary; every string is escaped first (:func:`cgmq_cli.sanitize.clean_tree`).
"""

from __future__ import annotations

import csv
import io
from typing import Any

from cgmq_cli.errors import UsageError
from cgmq_cli.render import Grid
from cgmq_cli.sanitize import clean_tree


EXPLAIN_COLUMNS = ("tensor", "width", "allowed", "dloss up", "cost up", "dloss down", "cost down", "bound by", "layers")
EXPLAIN_INTRO = ("a step up doubles a width, a step down halves it; dloss is the loss change the probes predict "
                 "(second order, averaged over batches); cost is the change of each budgeted metric")


def explained(report: dict, where: str = "the run") -> list[dict]:
    """report.json's ``tensors`` (one entry per quantizer), checked; a report without them is one error line."""
    tensors = report.get("tensors")
    if tensors is None:
        raise UsageError(f"{where} has no per-tensor explanation: its report.json was written by a cgmq without "
                         "`tensors`", "compress the model again to get `cgmq report --explain`")

    def number(v: Any) -> bool:
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))

    def deltas(v: Any) -> bool:
        return v is None or (isinstance(v, dict) and all(isinstance(k, str) and number(x) for k, x in v.items()))

    ok = isinstance(tensors, list)
    for t in tensors if ok else ():
        ok = ok and isinstance(t, dict) and isinstance(t.get("key"), str) and isinstance(t.get("label"), str) \
            and t.get("kind") in ("weight", "act") and isinstance(t.get("width"), int) \
            and isinstance(t.get("allowed"), list) and all(isinstance(b, int) for b in t["allowed"]) \
            and isinstance(t.get("gated"), bool) and number(t.get("predicted_dloss_up")) \
            and number(t.get("predicted_dloss_down")) and deltas(t.get("cost_up")) and deltas(t.get("cost_down")) \
            and isinstance(t.get("bound_by", []), list) and isinstance(t.get("layers", []), list)
    if not ok:
        raise UsageError(f"{where}'s report.json has a malformed `tensors` list; the run directory was damaged or edited",
                         "compress again")
    return clean_tree(tensors)


def _dloss(value: float | None, end: str) -> str:
    return end if value is None else f"{value:+.3g}"


def _cost_step(deltas: dict | None, end: str) -> str:
    if deltas is None:
        return end
    return ", ".join(f"{k} {v:+,.4g}" for k, v in deltas.items()) or "-"


def _layer_names(layers: list) -> str:
    return ", ".join(str(l.get("name", l)) if isinstance(l, dict) else str(l) for l in layers) or "-"


def _bound(t: dict) -> str:
    if not t["gated"]:
        return "fixed (no gate)"
    if t.get("predicted_dloss_up") is None and t.get("cost_up") is None:
        return "top width"
    return ", ".join(t.get("bound_by") or []) or "-"


def explain_rows(tensors: list[dict]) -> list[tuple[str, ...]]:
    """One row per tensor: width, allowed widths, one step up and down (predicted dloss, cost), bound, layers."""
    rows = []
    for t in tensors:
        steps = (("-",) * 4 if not t["gated"] else
                 (_dloss(t.get("predicted_dloss_up"), "top"), _cost_step(t.get("cost_up"), "top"),
                  _dloss(t.get("predicted_dloss_down"), "bottom"), _cost_step(t.get("cost_down"), "bottom")))
        rows.append((t["label"], str(t["width"]), ",".join(map(str, t["allowed"])), *steps, _bound(t),
                     _layer_names(t.get("layers") or [])))
    return rows


def explain_summary(tensors: list[dict]) -> str:
    gated = [t for t in tensors if t["gated"]]
    bound = [t for t in gated if t.get("bound_by")]
    top = [t for t in gated if t.get("predicted_dloss_up") is None and t.get("cost_up") is None]
    keys = sorted({k for t in bound for k in t["bound_by"]})
    return (f"{len(tensors)} tensors ({len(gated)} gated): {len(top)} at their widest width, {len(bound)} could not "
            f"widen without breaking a budget" + (f" ({', '.join(keys)})" if keys else ""))


def explain_table(report: dict, where: str = "the run") -> list:
    tensors = explained(report, where)
    grid = Grid(f"why these bits: run {clean_tree(report['run'])}", EXPLAIN_COLUMNS, tuple(explain_rows(tensors)),
                frozenset(("width", "dloss up", "dloss down")))
    return [grid, explain_summary(tensors), EXPLAIN_INTRO]


def explain_markdown(report: dict, where: str = "the run") -> str:
    tensors = explained(report, where)
    out = [f"### why these bits: cgmq run `{clean_tree(report['run'])}`", "",
           "| " + " | ".join(EXPLAIN_COLUMNS) + " |", "|---|---:|---|---:|---|---:|---|---|---|"]
    out += ["| " + " | ".join(f"`{r[0]}`" if i == 0 else r[i] for i in range(len(r))) + " |"
            for r in explain_rows(tensors)]
    out += ["", explain_summary(tensors) + "; " + EXPLAIN_INTRO]
    return "\n".join(out) + "\n"


def explain_csv(report: dict, where: str = "the run") -> str:
    tensors = explained(report, where)
    keys = sorted({k for t in tensors for d in (t.get("cost_up"), t.get("cost_down")) if d for k in d})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["key", "label", "kind", "width", "allowed", "gated", "predicted_dloss_up", "predicted_dloss_down",
                     *[f"cost_up_{k}" for k in keys], *[f"cost_down_{k}" for k in keys], "bound_by", "layers"])
    for t in tensors:
        up, down = t.get("cost_up") or {}, t.get("cost_down") or {}
        writer.writerow([t["key"], t["label"], t["kind"], t["width"], " ".join(map(str, t["allowed"])), t["gated"],
                         t.get("predicted_dloss_up"), t.get("predicted_dloss_down"),
                         *[up.get(k) for k in keys], *[down.get(k) for k in keys],
                         " ".join(t.get("bound_by") or []), _layer_names(t.get("layers") or [])])
    return buf.getvalue()
