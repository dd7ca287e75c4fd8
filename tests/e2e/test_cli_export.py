"""cgmq export / verify / demo through the CLI on real digits runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from cgmq_cli.cli import app

ARCH = "cgmq_cli.models:DigitsCNN"
runner = CliRunner()


@pytest.fixture(scope="module")
def runs(digits_ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for budget in (0.8, 2.0, 4.0):
        run = root / f"b{budget}"
        result = runner.invoke(app, ["compress", digits_ckpt, "--arch", ARCH, "--data", "digits", "--out", str(run),
                                     "--budget-rel-bops", str(budget), "--epochs", "2", "--gate-steps", "60",
                                     "--batch-size", "32"])
        assert result.exit_code == 0, result.output
        out[budget] = run
    return out


@pytest.mark.parametrize("budget", [0.8, 2.0, 4.0])
def test_export_parity_and_verify_bops_equal_report(runs: dict[float, Path], budget: float) -> None:
    run = runs[budget]
    report = json.loads((run / "report.json").read_text())
    result = runner.invoke(app, ["export", str(run), "--float", str(run / "float.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    exported = json.loads(result.stdout)
    assert exported["onnx"]["parity"]["agreement"] >= 99.9
    assert exported["onnx"]["parity"]["n"] == 360  # the whole digits validation split
    assert exported["onnx"]["size_bytes"] < exported["float"]["size_bytes"]
    verified = runner.invoke(app, ["verify", str(run / "model.onnx"), "--json"])
    assert verified.exit_code == 0, verified.output
    read = json.loads(verified.stdout)
    assert read["bops"] == report["cost"]["bops"]
    assert read["weight_bytes"] == report["cost"]["weight_bytes"]
    assert [(l["bits_w"], l["bits_a"]) for l in read["layers"]] == [(l["bits_w"], l["bits_a"]) for l in report["layers"]]
    meta = {p.key: p.value for p in onnx.load(str(run / "model.onnx")).metadata_props}
    assert json.loads(meta["cgmq.budget"])["rel_bops"] == budget and meta["cgmq.version"]


def test_verify_budget_exit_codes(runs: dict[float, Path]) -> None:
    run = runs[2.0]
    onnx_path = run / "checked.onnx"
    assert runner.invoke(app, ["export", str(run), "--onnx", str(onnx_path)]).exit_code == 0
    bops = json.loads((run / "report.json").read_text())["cost"]["bops"]
    ok = runner.invoke(app, ["verify", str(onnx_path), "--budget-bops", str(bops)])
    assert ok.exit_code == 0 and f"budget BOPs: {bops:,} <= {bops:,}: yes" in ok.stdout
    over = runner.invoke(app, ["verify", str(onnx_path), "--budget-bops", str(bops - 1)])
    assert over.exit_code == 4 and over.stderr.startswith("error: over budget: BOPs")
    rel = runner.invoke(app, ["verify", str(onnx_path), "--budget-rel-bops", "2"])
    assert rel.exit_code == 0


def test_export_never_overwrites_without_force(runs: dict[float, Path]) -> None:
    run = runs[4.0]
    target = run / "keep.onnx"
    target.write_bytes(b"user data")
    result = runner.invoke(app, ["export", str(run), "--onnx", str(target)])
    assert result.exit_code == 2 and "already exists" in result.stderr and "--force" in result.stderr
    assert target.read_bytes() == b"user data"
    forced = runner.invoke(app, ["export", str(run), "--onnx", str(target), "--force"])  # not cgmq's file
    assert forced.exit_code == 2 and "not an ONNX file exported by cgmq" in forced.stderr
    assert target.read_bytes() == b"user data"
    ours = run / "ours.onnx"
    assert runner.invoke(app, ["export", str(run), "--onnx", str(ours)]).exit_code == 0
    again = runner.invoke(app, ["export", str(run), "--onnx", str(ours), "--force"])  # cgmq's own export: replaced
    assert again.exit_code == 0 and onnx.load(str(ours)).graph.node
    pipe = run / "pipe.onnx"
    os.mkfifo(pipe)  # reading it to see whether cgmq made it would block forever
    for args in ([], ["--force"]):
        piped = runner.invoke(app, ["export", str(run), "--onnx", str(pipe), *args])
        assert piped.exit_code == 2 and "is not a regular file" in piped.stderr


def test_export_opsets_13_17_and_21(runs: dict[float, Path]) -> None:
    run = runs[0.8]
    widths = {w for l in json.loads((run / "report.json").read_text())["layers"] for w in (l["bits_w"], l["bits_a"])}
    for opset in (13, 17, 21):
        path = run / f"o{opset}.onnx"
        result = runner.invoke(app, ["export", str(run), "--onnx", str(path), "--opset", str(opset), "--json"])
        if opset < 21 and 16 in widths:  # no standard 16-bit container before opset 21
            assert result.exit_code == 2 and "needs opset 21 or newer" in result.stderr
            continue
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["onnx"]["parity"]["agreement"] >= 99.9
        verified = json.loads(runner.invoke(app, ["verify", str(path), "--json"]).stdout)
        assert verified["bops"] == json.loads((run / "report.json").read_text())["cost"]["bops"]
    assert runner.invoke(app, ["export", str(run), "--opset", "9"]).exit_code == 2


def test_verify_missing_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["verify", str(tmp_path / "nope.onnx")])
    assert result.exit_code == 2 and result.stderr == f"error: {tmp_path / 'nope.onnx'} not found\n"


def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "within budget: yes" in result.stdout and "top-1 agreement 100.00%" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["feasible"] and report["cost"]["rel_bops"] <= 2.0
    assert (out / "model.onnx").is_file()
    again = runner.invoke(app, ["demo", "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.stderr
