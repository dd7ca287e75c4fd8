"""`cgmq report --explain` and the wide-weights note, on hand-written report.json files."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cgmq_cli.cli import app

runner = CliRunner()

TENSORS = [
    {"key": "a_input", "label": "input of conv1", "kind": "act", "width": 8, "allowed": [8], "gated": False,
     "predicted_dloss_up": None, "predicted_dloss_down": None, "cost_up": None, "cost_down": None, "bound_by": [],
     "layers": [{"name": "conv1"}]},
    {"key": "w_conv1", "label": "weight of conv1", "kind": "weight", "width": 4, "allowed": [2, 4, 8, 16, 32],
     "gated": True, "predicted_dloss_up": -0.0123, "predicted_dloss_down": 0.25,
     "cost_up": {"rel_bops": 0.5}, "cost_down": {"rel_bops": -0.25}, "bound_by": ["rel_bops"],
     "layers": [{"name": "conv1"}]},
    {"key": "w_fc", "label": "weight of fc", "kind": "weight", "width": 32, "allowed": [2, 4, 8, 16, 32],
     "gated": True, "predicted_dloss_up": None, "predicted_dloss_down": 0.0004,
     "cost_up": None, "cost_down": {"rel_bops": -0.03, "weight_bytes": -1280}, "bound_by": [], "layers": ["fc"]},
]


def _run(root: Path, name: str = "r", tensors: list | None = None, bits_w: tuple[int, int] = (4, 32),
         weight_budget: float | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    layers = [{"name": "conv1", "op": "conv2d", "macs": 1000, "params": 100, "bits_w": bits_w[0], "bits_a": 8,
               "bops": 1000 * bits_w[0] * 8, "weight_bytes": 100 * bits_w[0] / 8 + 16},
              {"name": "fc", "op": "linear", "macs": 320, "params": 320, "bits_w": bits_w[1], "bits_a": 8,
               "bops": 320 * bits_w[1] * 8, "weight_bytes": 320 * bits_w[1] / 8 + 40}]
    bops = sum(l["bops"] for l in layers)
    wbytes = sum(l["weight_bytes"] for l in layers)
    report = {"run": name, "model": {"arch": "x:Net"}, "profile": "generic", "data": "digits", "epochs": 2,
              "seconds": 1.0, "budget": {"bops": None, "rel_bops": 3.0, "weight_bytes": weight_budget, "cost": None},
              "cost": {"bops": bops, "rel_bops": 100 * bops / (1320 * 1024), "weight_bytes": wbytes, "cost": bops,
                       "macs": 1320, "bops_fp32": 1320 * 1024},
              "feasible": True, "accuracy": {"float": 99.0, "quantized": 98.0}, "layers": layers}
    if tensors is not None:
        report["tensors"] = tensors
    (run / "report.json").write_text(json.dumps(report))
    return run


def test_explain_table_exact_rows(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(_run(tmp_path, tensors=TENSORS)), "--explain"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "why these bits: run r"
    header = [c.strip() for c in lines[2].strip("┃").split("┃")]
    assert header == ["tensor", "width", "allowed", "dloss up", "cost up", "dloss down", "cost down", "bound by",
                      "layers"]
    rows = [[c.strip() for c in line.strip("│").split("│")] for line in lines[4:7]]
    assert rows[0] == ["input of conv1", "8", "8", "-", "-", "-", "-", "fixed (no gate)", "conv1"]
    assert rows[1] == ["weight of conv1", "4", "2,4,8,16,32", "-0.0123", "rel_bops +0.5", "+0.25", "rel_bops -0.25",
                       "rel_bops", "conv1"]
    assert rows[2] == ["weight of fc", "32", "2,4,8,16,32", "top", "top", "+0.0004",
                       "rel_bops -0.03, weight_bytes -1,280", "top width", "fc"]
    assert lines[8] == ("3 tensors (2 gated): 1 at their widest width, 1 could not widen without breaking a budget "
                        "(rel_bops)")


def test_explain_markdown_json_csv(tmp_path: Path) -> None:
    run = _run(tmp_path, tensors=TENSORS)
    md = runner.invoke(app, ["report", str(run), "--explain", "--format", "markdown"]).stdout.splitlines()
    assert md[0] == "### why these bits: cgmq run `r`"
    assert ("| `weight of conv1` | 4 | 2,4,8,16,32 | -0.0123 | rel_bops +0.5 | +0.25 | rel_bops -0.25 | rel_bops "
            "| conv1 |") in md
    payload = json.loads(runner.invoke(app, ["report", str(run), "--explain", "--json"]).stdout)
    assert payload == {"run": "r", "tensors": TENSORS}
    rows = list(csv.DictReader(io.StringIO(runner.invoke(app, ["report", str(run), "--explain", "--format",
                                                               "csv"]).stdout)))
    assert [r["key"] for r in rows] == ["a_input", "w_conv1", "w_fc"]
    assert rows[1]["cost_up_rel_bops"] == "0.5" and rows[2]["cost_down_weight_bytes"] == "-1280"


def test_explain_without_tensors_is_one_line(tmp_path: Path) -> None:
    run = _run(tmp_path)
    result = runner.invoke(app, ["report", str(run), "--explain"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {run} has no per-tensor explanation: its report.json was written by a cgmq without `tensors`",
        "hint: compress the model again to get `cgmq report --explain`"]


@pytest.mark.parametrize("bad", [[{"key": "w"}], "not a list", [{**TENSORS[1], "width": "4"}],
                                 [{**TENSORS[1], "cost_up": {"rel_bops": "x"}}]])
def test_explain_refuses_a_malformed_list(tmp_path: Path, bad) -> None:
    result = runner.invoke(app, ["report", str(_run(tmp_path, tensors=bad)), "--explain"])
    assert result.exit_code == 2 and "malformed `tensors` list" in result.stderr and "Traceback" not in result.output


def test_explain_escapes_labels(tmp_path: Path) -> None:
    tensors = [{**TENSORS[1], "label": "weight of \x1b[31mevil"}]
    result = runner.invoke(app, ["report", str(_run(tmp_path, tensors=tensors)), "--explain"])
    assert result.exit_code == 0 and "\x1b" not in result.stdout and "weight of \\x1b[31mevil" in result.stdout


def test_plot_has_the_explain_panel(tmp_path: Path) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed")
    png = tmp_path / "why.png"
    result = runner.invoke(app, ["report", str(_run(tmp_path, tensors=TENSORS)), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    from matplotlib import image

    three = image.imread(str(png)).shape[0]
    plain = tmp_path / "plain.png"
    assert runner.invoke(app, ["report", str(_run(tmp_path, "s")), "--plot", str(plain)]).exit_code == 0
    assert three > image.imread(str(plain)).shape[0]  # a third panel: taller


def test_plot_without_matplotlib_names_the_install_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = runner.invoke(app, ["report", str(_run(tmp_path)), "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["error: --plot needs matplotlib, which is not installed",
                                          "hint: pip install matplotlib (from a cgmq checkout: pip install -e '.[plot]')"]


NOTE = ("note: weights wider than 8 bits hold 95% of the weight bytes and no budget bounds memory; add e.g. "
        "--budget-weight-bytes 426 (these widths with every weight at 8 bits or fewer)")


def test_wide_weights_note(tmp_path: Path) -> None:
    wide = _run(tmp_path, "wide", bits_w=(4, 32))  # fc at 32 bits: 1,320 of 1,386 weight bytes
    table = runner.invoke(app, ["report", str(wide)])
    assert table.exit_code == 0 and NOTE in table.stdout.splitlines()
    assert f"> {NOTE}" in runner.invoke(app, ["report", str(wide), "--format", "markdown"]).stdout.splitlines()
    narrow = _run(tmp_path, "narrow", bits_w=(4, 8))
    assert "note: weights wider" not in runner.invoke(app, ["report", str(narrow)]).stdout
    bounded = _run(tmp_path, "bounded", bits_w=(4, 32), weight_budget=5000)
    assert "note: weights wider" not in runner.invoke(app, ["report", str(bounded)]).stdout


def test_wide_weights_threshold_is_more_than_half(tmp_path: Path) -> None:
    from cgmq_cli import report as rep

    report = json.loads((_run(tmp_path, bits_w=(4, 32)) / "report.json").read_text())
    share, narrowed = rep.wide_weights(report)
    assert share == pytest.approx((320 * 4 + 40) / (100 * 4 / 8 + 16 + 320 * 4 + 40))
    assert narrowed == pytest.approx(66 + 320 + 40)  # fc at 8 bits: 320 bytes + 40 bias bytes
    report["layers"][1]["weight_bytes"] = report["cost"]["weight_bytes"] / 2  # exactly half: no note
    assert rep.notes(report) == []
