"""report.json -> Rich table, Markdown, CSV, JSON and a PNG figure.

Works on the plain report dictionaries that ``cgmq compress`` writes, so it
renders any finished run without rebuilding its model. Nothing imports this
module except the CLI (and render, for the coverage line). Every renderer first escapes the report's strings
(:func:`cgmq_cli.sanitize.clean_tree`): a layer or profile name cannot carry
terminal escapes or bidi marks into a table, a CSV file or a pull request.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

from rich.console import Group
from rich.table import Table

from cgmq_cli.errors import UsageError
from cgmq_cli.sanitize import clean_tree

LAYER_COLUMNS = ("layer", "op", "MACs", "params", "bits w/a", "BOPs", "share", "weight bytes")


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


def coverage_line(coverage: float, float_ops: list[dict]) -> str:
    """One line on how much of the model's compute is quantized, and what is left in float and why."""
    if not float_ops:
        return f"coverage: {coverage:.1f}% of the MACs are in quantized layers (nothing is left in float)"
    reasons = "; ".join(f"{op['what']}: {op['reason']}" for op in float_ops[:3])
    more = f"; and {len(float_ops) - 3} more" if len(float_ops) > 3 else ""
    return (f"coverage: {coverage:.1f}% of the MACs are in quantized layers; left in float (counted at 32x32 "
            f"bits): {reasons}{more}")


def report_coverage_line(report: dict) -> str:
    c = report["cost"]
    return coverage_line(c.get("coverage", 100.0), report.get("float_ops", []))


def _settings_line(report: dict) -> str:
    model = report["model"].get("arch") or report["model"].get("model")
    return (f"model {model}, profile {report['profile']}, data {report['data']}, "
            f"{report['epochs']} epochs, {report['seconds']:.1f} s")


def rich_report(report: dict) -> Group:
    report = clean_tree(report)
    layers = Table(title=f"run {report['run']}", title_justify="left")
    for col in LAYER_COLUMNS:
        layers.add_column(col, justify="left" if col in ("layer", "op", "bits w/a") else "right")
    for row in _layer_rows(report):
        layers.add_row(*row)
    c = report["cost"]
    layers.add_row("total", "", f"{c['macs']:,}", f"{sum(l['params'] for l in report['layers']):,}", "",
                   f"{c['bops']:,}", "100.0%", f"{c['weight_bytes']:,.0f}")
    budgets = Table(title="budgets", title_justify="left")
    for col in ("budget", "limit", "used", "margin"):
        budgets.add_column(col, justify="left" if col == "budget" else "right")
    for row in budget_rows(report):
        budgets.add_row(*row)
    acc = report["accuracy"]
    lines = [f"relative BOPs {c['rel_bops']:.3f}% of 32x32 (of all the model's MACs) | within budget: "
             f"{'yes' if report['feasible'] else 'NO'}",
             report_coverage_line(report),
             f"accuracy: float {acc['float']:.2f}% | quantized {acc['quantized']:.2f}% | "
             f"drop {acc['float'] - acc['quantized']:+.2f} points",
             _settings_line(report)]
    return Group(layers, budgets, *lines)


def markdown(report: dict) -> str:
    """One run as GitHub-flavoured Markdown (pastes cleanly into a pull request)."""
    report = clean_tree(report)
    c, acc = report["cost"], report["accuracy"]
    out = [f"### cgmq run `{report['run']}`", "",
           f"**Within budget: {'yes' if report['feasible'] else 'NO'}** · relative BOPs {c['rel_bops']:.3f}% · "
           f"accuracy {acc['quantized']:.2f}% (float {acc['float']:.2f}%, {acc['quantized'] - acc['float']:+.2f} points)", "",
           report_coverage_line(report), "",
           "| budget | limit | used | margin |", "|---|---:|---:|---:|"]
    out += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in budget_rows(report)]
    out += ["", "| " + " | ".join(LAYER_COLUMNS) + " |", "|---|---|---:|---:|---|---:|---:|---:|"]
    out += ["| " + " | ".join(f"`{r[0]}`" if i == 0 else r[i] for i in range(len(r))) + " |" for r in _layer_rows(report)]
    out += ["", _settings_line(report)]
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
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def comparison_table(reports: Sequence[dict]) -> Table:
    header, rows = comparison_rows(reports)
    table = Table(title="runs side by side", title_justify="left")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def plot(reports: Sequence[dict], path: Path) -> None:
    """Bits per layer (weights and activations) and each layer's share of BOPs, one panel pair per run.

    An existing file is replaced only when it is a PNG image (never report.json or another file of yours).
    """
    if path.is_symlink() or path.is_dir() or (path.exists() and path.open("rb").read(8) != b"\x89PNG\r\n\x1a\n"):
        raise UsageError(f"--plot {path} exists and is not a PNG image; refusing to replace it", "choose another path")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed",
                         "pip install 'cgmq[plot]' (or pip install matplotlib)") from None
    fig, axes = plt.subplots(2, len(reports), figsize=(max(6, 0.5 * len(reports[0]["layers"]) + 3) * len(reports), 7),
                             squeeze=False, sharex="col")
    for col, report in enumerate(reports):
        names = [l["name"] for l in report["layers"]]
        x = range(len(names))
        top, bottom = axes[0][col], axes[1][col]
        top.bar([i - 0.2 for i in x], [l["bits_w"] for l in report["layers"]], width=0.4, label="weights")
        top.bar([i + 0.2 for i in x], [l["bits_a"] for l in report["layers"]], width=0.4, label="input activations")
        top.set_yscale("log", base=2)
        top.set_ylim(1, 48)  # so that a 2-bit bar is visible
        top.set_yticks([2, 4, 8, 16, 32], labels=["2", "4", "8", "16", "32"])
        top.set_ylabel("bits")
        top.set_title(f"{report['run']}: {report['cost']['rel_bops']:.3f}% rel. BOPs, "
                      f"acc {report['accuracy']['quantized']:.2f}%")
        top.legend(loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=8, frameon=False)
        total = report["cost"]["bops"] or 1
        bottom.bar(list(x), [100 * l["bops"] / total for l in report["layers"]], color="tab:gray")
        bottom.set_ylabel("share of BOPs (%)")
        bottom.set_xticks(list(x), labels=names, rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
