"""report.json -> terminal tables (render.Grid), Markdown, CSV, JSON and a PNG figure.

Works on the plain report dictionaries that ``cgmq compress`` writes, so it
renders any finished run without rebuilding its model, and a sweep's table
(why each width is what it is: :mod:`cgmq_cli.report_explain`). Nothing imports this
module except the CLI and the sweep, which writes its tables with it. Every
renderer first escapes the report's strings (:func:`cgmq_cli.sanitize.clean_tree`):
a layer or profile name cannot carry terminal escapes or bidi marks into a
table, a CSV file or a pull request.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any, Sequence

from cgmq_cli.errors import UsageError
from cgmq_cli.render import Grid, coverage_line
from cgmq_cli.report_explain import explained
from cgmq_cli.sanitize import clean_tree

LAYER_COLUMNS = ("layer", "op", "MACs", "params", "bits w/a", "BOPs", "share", "weight bytes")
PLOT_HINT = "pip install matplotlib (from a cgmq checkout: pip install -e '.[plot]')"
WIDE_WEIGHTS_SHARE = 0.5  # the weight bytes' share of weights wider than 8 bits above which the report says so


def wide_weights(report: dict) -> tuple[float, float] | None:
    """(share of the weight bytes in weights wider than 8 bits, weight bytes with every weight at most 8 bits).

    None when the run had a weight-bytes budget or reports no weight bytes.
    Layer weight bytes include their float32 biases; parameters outside the
    quantized layers count in the total only.
    """
    total = report["cost"].get("weight_bytes") or 0
    if report["budget"].get("weight_bytes") is not None or total <= 0:
        return None
    wide = sum(l["weight_bytes"] for l in report["layers"] if l["bits_w"] > 8)
    narrowed = total - sum(l["params"] * (l["bits_w"] - min(l["bits_w"], 8)) / 8 for l in report["layers"])
    return wide / total, narrowed


def notes(report: dict) -> list[str]:
    """One-line remarks on a run that its numbers alone do not show."""
    out = []
    wide = wide_weights(report)
    if wide is not None and wide[0] > WIDE_WEIGHTS_SHARE:
        out.append(f"note: weights wider than 8 bits hold {100 * wide[0]:.0f}% of the weight bytes and no budget "
                   f"bounds memory; add e.g. --budget-weight-bytes {wide[1]:.0f} (these widths with every weight at "
                   "8 bits or fewer)")
    return out


def _layer_rows(report: dict) -> list[tuple[str, ...]]:
    total = report["cost"]["bops"] or 1
    return [(l["name"], l["op"], f"{l['macs']:,}", f"{l['params']:,}", f"{l['bits_w']}/{l['bits_a']}",
             f"{l['bops']:,}", f"{100 * l['bops'] / total:.1f}%", f"{l['weight_bytes']:,.0f}") for l in report["layers"]]


def budget_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(budget, limit, used, margin) for every budget that was set."""
    rows = []
    for name, limit in report["budget"].items():
        if limit is None:
            continue
        used = report["cost"][name]
        rows.append((name, f"{limit:,.6g}", f"{used:,.6g}", f"{100 * (1 - used / limit):+.1f}%"))
    return rows


def report_coverage_line(report: dict) -> str:
    c = report["cost"]
    return coverage_line(c.get("coverage", 100.0), report.get("float_ops", []))


def _settings_line(report: dict) -> str:
    model = report["model"].get("arch") or report["model"].get("model")
    return (f"model {model}, profile {report['profile']}, data {report['data']}, "
            f"{report['epochs']} epochs, {report['seconds']:.1f} s")


def blocks(report: dict) -> list:
    """One run for the terminal: the layer table, the budget table and summary lines (see render.show)."""
    report = clean_tree(report)
    c = report["cost"]
    rows = _layer_rows(report) + [("total", "", f"{c['macs']:,}", f"{sum(l['params'] for l in report['layers']):,}", "",
                                   f"{c['bops']:,}", "100.0%", f"{c['weight_bytes']:,.0f}")]
    layers = Grid(f"run {report['run']}", LAYER_COLUMNS, tuple(rows),
                  frozenset(col for col in LAYER_COLUMNS if col not in ("layer", "op", "bits w/a")))
    budgets = Grid("budgets", ("budget", "limit", "used", "margin"), tuple(budget_rows(report)),
                   frozenset(("limit", "used", "margin")))
    acc = report["accuracy"]
    lines = [f"relative BOPs {c['rel_bops']:.3f}% of 32x32 (of all the model's MACs) | within budget: "
             f"{'yes' if report['feasible'] else 'NO'}",
             report_coverage_line(report),
             f"accuracy: float {acc['float']:.2f}% | quantized {acc['quantized']:.2f}% | "
             f"drop {acc['float'] - acc['quantized']:+.2f} points",
             _settings_line(report)]
    return [layers, budgets, *lines, *notes(report)]


def _cell(text: Any) -> str:
    """``text`` for a Markdown table cell: a ``|`` in it would end the cell."""
    return str(text).replace("|", "\\|")


def _code(text: Any) -> str:
    """``text`` as a Markdown code span that survives a table cell: ``|`` escaped, a fence longer than any backtick run."""
    text = _cell(text)
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if fence != "`" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def markdown(report: dict) -> str:
    """One run as GitHub-flavoured Markdown (pastes cleanly into a pull request)."""
    report = clean_tree(report)
    c, acc = report["cost"], report["accuracy"]
    out = [f"### cgmq run {_code(report['run'])}", "",
           f"**Within budget: {'yes' if report['feasible'] else 'NO'}** · relative BOPs {c['rel_bops']:.3f}% · "
           f"accuracy {acc['quantized']:.2f}% (float {acc['float']:.2f}%, {acc['quantized'] - acc['float']:+.2f} points)", "",
           report_coverage_line(report), "",
           "| budget | limit | used | margin |", "|---|---:|---:|---:|"]
    out += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in budget_rows(report)]
    out += ["", "| " + " | ".join(LAYER_COLUMNS) + " |", "|---|---|---:|---:|---|---:|---:|---:|"]
    out += ["| " + " | ".join(_code(r[0]) if i == 0 else r[i] for i in range(len(r))) + " |" for r in _layer_rows(report)]
    out += ["", _settings_line(report)]
    out += [f"\n> {note}" for note in notes(report)]
    return "\n".join(out) + "\n"


def csv_text(report: dict) -> str:
    report = clean_tree(report)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["layer", "op", "macs", "params", "bits_w", "bits_a", "bops", "bops_share", "weight_bytes"])
    total = report["cost"]["bops"] or 1
    for l in report["layers"]:
        writer.writerow([l["name"], l["op"], l["macs"], l["params"], l["bits_w"], l["bits_a"], l["bops"],
                         f"{l['bops'] / total:.6f}", l["weight_bytes"]])
    return buf.getvalue()


def comparison_rows(reports: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Side-by-side: one column per run, rows for totals and every layer's widths."""
    reports = [clean_tree(r) for r in reports]
    header = ["", *[r["run"] for r in reports]]
    rows = [
        ["budget", *[", ".join(f"{k} {v:,.6g}" for k, v in r["budget"].items() if v is not None) for r in reports]],
        ["relative BOPs", *[f"{r['cost']['rel_bops']:.3f}%" for r in reports]],
        ["BOPs", *[f"{r['cost']['bops']:,}" for r in reports]],
        ["weight bytes", *[f"{r['cost']['weight_bytes']:,.0f}" for r in reports]],
        ["within budget", *["yes" if r["feasible"] else "NO" for r in reports]],
        ["accuracy", *[f"{r['accuracy']['quantized']:.2f}% (float {r['accuracy']['float']:.2f}%)" for r in reports]],
    ]
    names = list(dict.fromkeys(l["name"] for r in reports for l in r["layers"]))
    for name in names:
        cells = []
        for r in reports:
            layer = next((l for l in r["layers"] if l["name"] == name), None)
            cells.append(f"{layer['bits_w']}/{layer['bits_a']}" if layer else "-")
        rows.append([f"{name} w/a", *cells])
    return header, rows


def comparison_markdown(reports: Sequence[dict]) -> str:
    header, rows = comparison_rows(reports)
    out = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(out) + "\n"


def comparison_table(reports: Sequence[dict]) -> Grid:
    header, rows = comparison_rows(reports)
    return Grid("runs side by side", tuple(header), tuple(tuple(r) for r in rows), frozenset(header[1:]))


# --------------------------------------------------------------------------------- sweeps ---

SWEEP_COLUMNS = ("run", "budget", "BOPs", "rel BOPs", "weight bytes", "accuracy", "drop", "within budget", "Pareto")


def _budget_text(point: dict, key: str) -> str:
    return ", ".join(f"{k}={v:,.6g}" for k, v in point["budget"].items() if v is not None and k == key) or \
        f"{key}={point['value']:,.6g}"


def sweep_rows(table: dict) -> list[tuple[str, ...]]:
    table = clean_tree(table)
    key = table["key"]
    rows = []
    for p in table["points"]:
        c, acc = p["cost"], p["accuracy"]
        row = (p["run"], _budget_text(p, key), f"{c['bops']:,}", f"{c['rel_bops']:.3f}%", f"{c['weight_bytes']:,.0f}",
               f"{acc['quantized']:.2f}%", f"{acc['float'] - acc['quantized']:+.2f}", "yes" if p.get("feasible") else "NO",
               "*" if p.get("pareto") else "")
        if table.get("target"):
            row += ("yes" if p.get("meets_drop") else "no",)
        rows.append(row)
    return rows


def _sweep_columns(table: dict) -> tuple[str, ...]:
    return SWEEP_COLUMNS + (("meets drop",) if table.get("target") else ())


def sweep_lines(table: dict) -> list[str]:
    """The sweep's settings and, in the target mode, its answer."""
    table = clean_tree(table)
    fixed = ", ".join(f"{k}={v:,.6g}" for k, v in (table.get("fixed_budget") or {}).items())
    acc = table.get("float_accuracy")
    lines = [f"model {table['model']}, profile {table['profile']}, data {table['data']}; float accuracy "
             + (f"{acc:.2f}%" if isinstance(acc, (int, float)) else "-")
             + f"; {table['runs']} runs, {table.get('seconds', 0):.1f} s" + (f"; every point also within {fixed}" if fixed else "")]
    target = table.get("target")
    if target:
        if target.get("chosen") is not None:
            lines.append(f"smallest budget with an accuracy drop of at most {target['max_accuracy_drop']:g} points: "
                         f"{table['key']}={target['chosen']:g} (run {target['chosen_run']})")
        else:
            lines.append(f"no budget up to {table['key']}={target['high']:g} kept the accuracy drop within "
                         f"{target['max_accuracy_drop']:g} points")
    if not table.get("complete", True):
        lines.append("the sweep did not finish: the table holds the points done so far")
    return lines


def sweep_table(table: dict) -> list:
    cols = _sweep_columns(table)
    grid = Grid(f"sweep {clean_tree(table['sweep'])} over {table['key']} (* = on the Pareto front)", cols,
                tuple(sweep_rows(table)), frozenset(c for c in cols if c not in ("run", "budget")))
    return [grid, *sweep_lines(table)]


def sweep_markdown(table: dict) -> str:
    cols = _sweep_columns(table)
    out = [f"### cgmq sweep {_code(clean_tree(table['sweep']))} over {table['key']}", "",
           "| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    out += ["| " + " | ".join(_code(r[0]) if i == 0 else r[i] for i in range(len(r))) + " |" for r in sweep_rows(table)]
    out += ["", *sweep_lines(table), "", "`*`: on the Pareto front (no other point is cheaper and at least as accurate)"]
    return "\n".join(out) + "\n"


def sweep_csv(table: dict) -> str:
    table = clean_tree(table)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run", "budget_key", "budget_value", "bops", "rel_bops", "weight_bytes", "cost", "accuracy_float",
                     "accuracy_quantized", "drop", "within_budget", "pareto", "meets_drop"])
    for p in table["points"]:
        c, acc = p["cost"], p["accuracy"]
        writer.writerow([p["run"], table["key"], p["value"], c["bops"], c["rel_bops"], c["weight_bytes"], c.get("cost"),
                         acc["float"], acc["quantized"], acc["float"] - acc["quantized"], p.get("feasible"),
                         p.get("pareto"), p.get("meets_drop")])
    return buf.getvalue()


# ---------------------------------------------------------------------------------- plots ---


def _pyplot(path: Path, flag: str = "--plot"):
    """matplotlib's pyplot (Agg), after refusing a target that is not a PNG image (never report.json or your file)."""
    if path.is_symlink() or path.is_dir() or (path.exists() and path.open("rb").read(8) != b"\x89PNG\r\n\x1a\n"):
        raise UsageError(f"{flag} {path} exists and is not a PNG image; refusing to replace it", "choose another path")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(f"{flag} needs matplotlib, which is not installed", PLOT_HINT) from None
    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120)
        tmp.replace(path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()


def _explain_panel(ax, report: dict) -> None:
    """Why these bits: per tensor the predicted loss change of one step down (cost saved) and up (cost added)."""
    tensors = explained(report)
    x = range(len(tensors))
    down = [t.get("predicted_dloss_down") or 0.0 for t in tensors]
    up = [-(t.get("predicted_dloss_up") or 0.0) for t in tensors]
    ax.bar([i - 0.2 for i in x], down, width=0.4, color="tab:red", label="loss increase of a step down")
    bars = ax.bar([i + 0.2 for i in x], up, width=0.4, color="tab:green", label="loss decrease of a step up")
    for bar, t in zip(bars, tensors):
        if t.get("bound_by"):
            bar.set_hatch("//")
            bar.set_edgecolor("black")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel("predicted loss change")
    ax.set_title("why these bits (hatched: a step up would break a budget)", fontsize=9)
    ax.set_xticks(list(x), labels=[f"{t['label']} ({t['width']}b)" for t in tensors], rotation=60, ha="right",
                  fontsize=7)
    ax.legend(fontsize=7, frameon=False)


def plot(reports: Sequence[dict], path: Path) -> None:
    """Bits per layer (weights and activations) and each layer's share of BOPs, one panel pair per run.

    Runs whose report.json lists its ``tensors`` get a third panel: the
    predicted loss change of one step up and down per tensor (why these bits).
    An existing file is replaced only when it is a PNG image (never report.json or another file of yours).
    """
    plt = _pyplot(path)
    explain = all(r.get("tensors") for r in reports)
    rows = 3 if explain else 2
    width = max(6, 0.5 * max(len(reports[0]["layers"]), len(reports[0].get("tensors") or []) if explain else 0) + 3)
    fig, axes = plt.subplots(rows, len(reports), figsize=(width * len(reports), 7 + 4 * explain), squeeze=False)
    for col, report in enumerate(reports):
        names = [l["name"] for l in report["layers"]]
        x = range(len(names))
        top, bottom = axes[0][col], axes[1][col]
        top.bar([i - 0.2 for i in x], [l["bits_w"] for l in report["layers"]], width=0.4, label="weights")
        top.bar([i + 0.2 for i in x], [l["bits_a"] for l in report["layers"]], width=0.4, label="input activations")
        top.set_yscale("log", base=2)
        top.set_ylim(1, 48)  # so that a 2-bit bar is visible
        top.set_yticks([2, 4, 8, 16, 32], labels=["2", "4", "8", "16", "32"])
        top.set_xticks(list(x), labels=[])
        top.set_ylabel("bits")
        top.set_title(f"{report['run']}: {report['cost']['rel_bops']:.3f}% rel. BOPs, "
                      f"acc {report['accuracy']['quantized']:.2f}%")
        top.legend(loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=8, frameon=False)
        total = report["cost"]["bops"] or 1
        bottom.bar(list(x), [100 * l["bops"] / total for l in report["layers"]], color="tab:gray")
        bottom.set_ylabel("share of BOPs (%)")
        bottom.set_xticks(list(x), labels=names, rotation=60, ha="right", fontsize=8)
        if explain:
            _explain_panel(axes[2][col], report)
    _save(plt, fig, path)


def sweep_plot(table: dict, path: Path, flag: str = "--plot") -> None:
    """Accuracy against the swept cost, every point labelled by its budget, the Pareto front as a line."""
    plt = _pyplot(path, flag)
    key = table["key"]
    points = sorted(table["points"], key=lambda p: p["cost"][key])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [p["cost"][key] for p in points]
    ys = [p["accuracy"]["quantized"] for p in points]
    front = [p for p in points if p.get("pareto")]
    ax.plot([p["cost"][key] for p in front], [p["accuracy"]["quantized"] for p in front], color="tab:orange",
            marker="o", markersize=10, linewidth=2, zorder=2, label="Pareto front")
    ax.scatter(xs, ys, color="tab:blue", zorder=3, label="runs")
    for i, p in enumerate(points):
        ax.annotate(f"<= {p['value']:g}", (p["cost"][key], p["accuracy"]["quantized"]), fontsize=7,
                    textcoords="offset points", xytext=(5, -12 if i % 2 else 6))
    if isinstance(table.get("float_accuracy"), (int, float)):
        ax.axhline(table["float_accuracy"], color="gray", linestyle="--", linewidth=1, label="float")
        target = table.get("target")
        if target:
            ax.axhline(table["float_accuracy"] - target["max_accuracy_drop"], color="tab:red", linestyle=":",
                       linewidth=1, label=f"float - {target['max_accuracy_drop']:g} points")
    if xs and min(xs) > 0 and max(xs) / min(xs) > 8:
        ax.set_xscale("log")
    ax.set_xlabel(f"{key} of the run (labels: its budget)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"sweep {table['sweep']}: accuracy against {key}")
    ax.legend(fontsize=8, frameon=False)
    _save(plt, fig, path)
