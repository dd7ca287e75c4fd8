"""cgmq report on hand-written report.json files: exact lines, comparison, plot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cgmq_cli.cli import app

runner = CliRunner()


def _run(root: Path, name: str, bits: tuple[int, int], acc: float) -> Path:
    run = root / name
    run.mkdir()
    (run / "config.json").write_text("{}")
    macs = [1000, 3000]
    layers = [{"name": n, "op": "conv2d", "macs": m, "params": 10, "bits_w": bits[0], "bits_a": bits[1],
               "bops": m * bits[0] * bits[1], "weight_bytes": 10 * bits[0] / 8} for n, m in zip(("a", "b"), macs)]
    bops = sum(l["bops"] for l in layers)
    report = {"run": name, "model": {"arch": "x:Net"}, "profile": "generic", "data": "digits", "epochs": 6,
              "seconds": 1.5, "budget": {"bops": 40000, "rel_bops": None, "weight_bytes": None, "cost": None},
              "cost": {"bops": bops, "rel_bops": 100 * bops / 4096000, "weight_bytes": 2.5 * bits[0], "cost": bops,
                       "macs": 4000, "bops_fp32": 4096000},
              "feasible": bops <= 40000, "accuracy": {"float": 99.0, "quantized": acc}, "layers": layers}
    (run / "report.json").write_text(json.dumps(report))
    return run


def test_markdown_exact(tmp_path: Path) -> None:
    run = _run(tmp_path, "r4", (4, 2), 98.5)
    out = runner.invoke(app, ["report", str(run), "--format", "markdown"]).stdout.splitlines()
    assert out[0] == "### cgmq run `r4`"
    assert out[2] == "**Within budget: yes** · relative BOPs 0.781% · accuracy 98.50% (float 99.00%, -0.50 points)"
    assert "| bops | 40,000 | 32,000 | +20.0% |" in out
    assert "| `b` | conv2d | 3,000 | 10 | 4/2 | 24,000 | 75.0% | 5 |" in out


def test_markdown_cells_keep_their_columns_with_pipes_and_backticks_in_names(tmp_path: Path) -> None:
    run = _run(tmp_path, "r4", (4, 2), 98.5)
    report = json.loads((run / "report.json").read_text())
    report["layers"][1]["name"] = "fc|a`b"  # a module added with add_module may be named anything
    (run / "report.json").write_text(json.dumps(report))
    out = runner.invoke(app, ["report", str(run), "--format", "markdown"]).stdout.splitlines()
    assert "| `` fc\\|a`b `` | conv2d | 3,000 | 10 | 4/2 | 24,000 | 75.0% | 5 |" in out
    side = runner.invoke(app, ["report", str(run), str(run), "--format", "markdown"]).stdout.splitlines()
    assert "| fc\\|a`b w/a | 4/2 | 4/2 |" in side


def test_side_by_side(tmp_path: Path) -> None:
    a, b = _run(tmp_path, "r4", (4, 2), 98.5), _run(tmp_path, "r8", (8, 8), 99.0)
    md = runner.invoke(app, ["report", str(a), str(b), "--format", "markdown"])
    lines = md.stdout.splitlines()
    assert lines[0] == "|  | r4 | r8 |"
    assert "| within budget | yes | NO |" in lines and "| a w/a | 4/2 | 8/8 |" in lines
    table = runner.invoke(app, ["report", str(a), str(b)])
    assert table.exit_code == 0 and "runs side by side" in table.stdout
    both = json.loads(runner.invoke(app, ["report", str(a), str(b), "--format", "json"]).stdout)
    assert [r["run"] for r in both["runs"]] == ["r4", "r8"]


def test_bad_format_and_missing_run(tmp_path: Path) -> None:
    run = _run(tmp_path, "r4", (4, 2), 98.5)
    bad = runner.invoke(app, ["report", str(run), "--format", "xml"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --format 'xml'")
    missing = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "is not a cgmq run directory" in missing.stderr


def test_plot_or_clear_message(tmp_path: Path) -> None:
    run = _run(tmp_path, "r4", (2, 2), 98.5)
    png = tmp_path / "bits.png"
    result = runner.invoke(app, ["report", str(run), "--plot", str(png)])
    if importlib.util.find_spec("matplotlib") is None:
        assert result.exit_code == 2 and "--plot needs matplotlib" in result.stderr
        assert not png.exists()
    else:
        assert result.exit_code == 0, result.output
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_json(tmp_path: Path) -> None:
    run = _run(tmp_path, "r8", (8, 8), 99.0)  # 8/8 is over the 40,000 BOPs budget
    result = runner.invoke(app, ["check", str(run), "--json"])
    assert result.exit_code == 4
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and payload["checks"][0]["name"] == "budget bops"


def test_progress_bars_only_on_a_terminal_without_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    from rich.console import Console

    from cgmq_cli import render

    tty = Console(file=io.StringIO(), force_terminal=True)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert render.live_allowed(tty)
    monkeypatch.setenv("NO_COLOR", "1")
    assert not render.live_allowed(tty)
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)  # e.g. --json > file
    assert not render.live_allowed(tty)
    assert not render.live_allowed(Console(file=io.StringIO(), force_terminal=False))
