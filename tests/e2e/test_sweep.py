"""cgmq sweep: one compress per budget (shared start), the table and plot, the accuracy-target bisection."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
from pathlib import Path

import pytest

from cli_helpers import ARCH, cli, one_line_error
from cgmq_cli import sweep as sweep_mod
from cgmq_cli.errors import EXIT_BAD_INPUT, EXIT_INFEASIBLE

TINY = ["--data", "digits", "--epochs", "2", "--subset", "512", "--gate-steps", "20"]
BUDGETS = [0.6, 1.0, 2.0, 4.0]


@pytest.fixture(scope="module")
def swept(digits_ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("sweep") / "sw"
    result = cli("sweep", digits_ckpt, "--arch", ARCH, *TINY, "--budgets", "rel_bops=0.6,1,2,4",
                 "--budget-weight-bytes", "60000", "--out", out)
    assert result.exit_code == 0, result.output
    return out, result


def test_every_point_within_its_budget(swept) -> None:
    out, result = swept
    table = json.loads((out / "sweep.json").read_text())
    assert table["complete"] and table["key"] == "rel_bops" and table["fixed_budget"] == {"weight_bytes": 60000.0}
    assert [p["value"] for p in table["points"]] == BUDGETS
    for point in table["points"]:
        run = json.loads((out / point["run"] / "report.json").read_text())  # every run is a normal run directory
        assert run["feasible"] and point["feasible"]
        assert run["cost"]["rel_bops"] <= point["value"] and run["cost"]["weight_bytes"] <= 60000
        assert run["budget"]["rel_bops"] == point["value"] and run["budget"]["weight_bytes"] == 60000
        assert run["accuracy"]["float"] == table["float_accuracy"]  # one float evaluation, shared
    assert table["points"][0]["pareto"]  # the cheapest point is never dominated
    assert f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'sweep.csv'}" in result.stdout


def test_table_files_and_plot(swept) -> None:
    out, _ = swept
    md = (out / "sweep.md").read_text().splitlines()
    assert md[0] == "### cgmq sweep `sw` over rel_bops"
    assert md[2] == "| run | budget | BOPs | rel BOPs | weight bytes | accuracy | drop | within budget | Pareto |"
    rows = list(csv.DictReader(io.StringIO((out / "sweep.csv").read_text())))
    assert [float(r["budget_value"]) for r in rows] == BUDGETS and all(r["within_budget"] == "True" for r in rows)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_shows_a_sweep(swept) -> None:
    out, _ = swept
    table = cli("report", out)
    assert table.exit_code == 0 and table.stdout.splitlines()[0] == "sweep sw over rel_bops (* = on the Pareto front)"
    assert json.loads(cli("report", out, "--json").stdout) == json.loads((out / "sweep.json").read_text())
    assert cli("report", out, "--format", "csv").stdout == (out / "sweep.csv").read_text()
    one_line_error(cli("report", out, "--explain"), EXIT_BAD_INPUT, "is a sweep")
    one_line_error(cli("report", out, out / "rel_bops-1"), EXIT_BAD_INPUT, "is a sweep directory")
    assert cli("report", out / "rel_bops-1").exit_code == 0  # its runs are ordinary runs
    for command in (["check", out], ["export", out, "--onnx", out.parent / "x.onnx"], ["compress", "--resume", out]):
        one_line_error(cli(*command), EXIT_BAD_INPUT, f"{out} is a sweep, not one run", f"e.g. {out / 'rel_bops-0.6'}")
    assert not (out.parent / "x.onnx").exists()


def test_target_meets_the_drop(digits_ckpt: str, tmp_path: Path) -> None:
    out = tmp_path / "target"
    # The allowed drop is wide (3 points) because a 2-epoch run's accuracy differs between processes by a
    # point (360 validation images, oneDNN's thread order): the test is about the search, not the accuracy.
    result = cli("sweep", digits_ckpt, "--arch", ARCH, *TINY, "--budgets", "rel_bops=0.6,4", "--max-accuracy-drop",
                 "3", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout)
    chosen = table["target"]["chosen"]
    assert table["mode"] == "target" and table["runs"] <= 6 and chosen is not None
    point = next(p for p in table["points"] if p["value"] == chosen)
    assert point["drop"] <= 3 and point["meets_drop"] and point["cost"]["rel_bops"] <= chosen
    assert all((out / p["run"] / "report.json").is_file() for p in table["points"])  # every run kept
    assert all(p["value"] >= chosen or not p["meets_drop"] for p in table["points"])  # the smallest that met it


def test_refused_before_any_run(digits_ckpt: str, tmp_path: Path) -> None:
    out = tmp_path / "s"
    one_line_error(cli("sweep", digits_ckpt, "--arch", ARCH, *TINY, "--budgets", "rel_bops=0.001,1", "--out", out),
                   EXIT_INFEASIBLE, "below the minimum reachable")
    assert not out.exists()
    for bad, needle in (("rel_bops", "expected KEY=V1,V2"), ("speed=1", "expected KEY=V1,V2"),
                        ("rel_bops=1,x", "is not a number"), ("rel_bops=200", "at most 100")):
        one_line_error(cli("sweep", digits_ckpt, "--arch", ARCH, *TINY, "--budgets", bad, "--out", out),
                       EXIT_BAD_INPUT, needle)
    one_line_error(cli("sweep", digits_ckpt, "--arch", ARCH, *TINY, "--budgets", "rel_bops=1,2", "--budget-rel-bops",
                       "3", "--out", out), EXIT_BAD_INPUT, "both set the swept budget")
    one_line_error(cli("sweep", digits_ckpt, "--arch", ARCH, *TINY, "--budgets", "rel_bops=1", "--max-accuracy-drop",
                       "1", "--out", out), EXIT_BAD_INPUT, "LOW,HIGH")
    one_line_error(cli("sweep", digits_ckpt, "--arch", ARCH, *TINY, "--budgets", "rel_bops=1,2,3", "--max-accuracy-drop",
                       "1", "--out", out), EXIT_BAD_INPUT, "LOW,HIGH, not 3 value(s)")  # the 2 was dropped unsaid
    one_line_error(cli("sweep", digits_ckpt, "--arch", ARCH, *TINY, "--budgets", "rel_bops=1.5", "--max-runs", "3",
                       "--out", out), EXIT_BAD_INPUT, "--max-runs bounds the search of --max-accuracy-drop")
    assert not out.exists()


class FakeSweep(sweep_mod._Sweep):
    """The bisection without training: accuracy drops by 3 points per halving below a budget of 1.5."""

    def __init__(self, settings, key, out, force, mode, on_event, notify, target=None) -> None:  # noqa: ANN001
        self.key, self.out, self.target, self.points, self.calls, self.run = key, out, target, [], [], None

    def start(self, values) -> None:
        pass

    def compress(self, value, index=None, total=None) -> dict:
        self.calls.append(value)
        drop = max(0.0, 3 * math.log2(1.5 / value))
        report = {"accuracy": {"float": 99.0, "quantized": 99.0 - drop}, "budget": {"rel_bops": value},
                  "cost": {"rel_bops": value}, "feasible": True, "seconds": 0.0}
        point = sweep_mod._point(f"p{len(self.points)}", self.key, value, report, self.target["max_accuracy_drop"])
        self.points.append(point)
        return point

    def finish(self):
        return sweep_mod.SweepResult(self.out, {"target": self.target})


@pytest.mark.parametrize("low, high, drop, runs", [(0.25, 8.0, 1.0, 6), (0.25, 8.0, 20.0, 2), (0.25, 1.0, 1.0, 6),
                                                   (0.25, 8.0, 1.0, 3)])
def test_bisection_bounds_runs_and_keeps_the_answer_met(monkeypatch, tmp_path: Path, low, high, drop, runs) -> None:
    made = []

    def fake(*args, **kwargs):
        made.append(FakeSweep(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(sweep_mod, "_Sweep", fake)
    result = sweep_mod.run_target(None, "rel_bops", low, high, drop, tmp_path / "t", max_runs=runs)
    calls = made[0].calls
    assert len(calls) <= runs and calls[0] == high
    chosen = result.chosen
    if 3 * math.log2(1.5 / high) > drop:  # even the top budget misses: no answer, one run
        assert chosen is None and calls == [high]
        return
    assert chosen is not None and max(0.0, 3 * math.log2(1.5 / chosen)) <= drop
    failing = [v for v in calls if 3 * math.log2(1.5 / v) > drop]
    assert all(v < chosen for v in failing)
    if runs == 6 and drop == 1.0:  # the true threshold is 1.5 * 2**(-1/3) = 1.19: bisection gets close
        assert 1.19 <= chosen < 1.6


def test_an_augmentation_the_data_cannot_take_is_refused_before_the_sweep_directory_exists(tmp_path: Path) -> None:
    import torch

    (tmp_path / "flat.py").write_text(
        "import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\n\n"
        "class Net(nn.Sequential):\n    def __init__(self):\n        super().__init__(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))\n\n"
        "def fn():\n    g = torch.Generator().manual_seed(0)\n    x = torch.randn(96, 16, generator=g)\n"
        "    ds = TensorDataset(x, torch.arange(96) % 3)\n    return ds, ds\n")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    torch.save(model.state_dict(), tmp_path / "mlp.pt")
    out = tmp_path / "sw"
    one_line_error(cli("sweep", tmp_path / "mlp.pt", "--arch", f"{tmp_path}/flat.py:Net", "--data",
                       f"{tmp_path}/flat.py:fn", "--augment", "hflip", "--epochs", "1", "--budgets", "rel_bops=20,40",
                       "--out", out), EXIT_BAD_INPUT, "--augment hflip transforms images")
    assert not out.exists()


def test_report_says_when_a_point_changed_after_the_sweep(swept, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "sw"
    shutil.copytree(swept[0], out, symlinks=True)
    assert "changed after the sweep" not in cli("report", out).stderr
    report = json.loads((out / "rel_bops-1" / "report.json").read_text())
    report["accuracy"]["quantized"] -= 5  # e.g. compress --force --out sw/rel_bops-1 with other settings
    (out / "rel_bops-1" / "report.json").write_text(json.dumps(report))
    shown = cli("report", out, "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["points"]  # stdout stays the table's JSON
    assert f"note: rel_bops-1 in {out} changed after the sweep" in shown.stderr
