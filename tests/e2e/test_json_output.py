"""With --json every exit code prints exactly one JSON object on stdout; advertised usage works as written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli_helpers import ARCH, cli, one_line_error
from cgmq_cli import api
from cgmq_cli.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_INFEASIBLE, EXIT_INTERNAL, EXIT_INTERRUPTED


def _one_object(result) -> dict:
    """stdout is exactly one JSON object (json.loads of the whole text)."""
    payload = json.loads(result.stdout)
    assert isinstance(payload, dict), result.stdout
    return payload


def _error_object(result, code: int, *needles: str) -> dict:
    line = one_line_error(result, code, *needles)  # stderr keeps the human lines
    payload = _one_object(result)
    assert payload["exit_code"] == code and payload["error"] == line[len("error: "):]
    hint = [l for l in result.stderr.splitlines() if l.startswith("hint: ")]
    assert payload["hint"] == (hint[0][len("hint: "):] if hint else None)
    return payload


def test_bad_input_exit_2(tmp_path: Path) -> None:
    _error_object(cli("inspect", tmp_path / "missing.pt", "--json"), EXIT_BAD_INPUT, "model file not found")
    _error_object(cli("report", tmp_path / "nope", "--json"), EXIT_BAD_INPUT, "is not a cgmq run directory")
    _error_object(cli("report", tmp_path / "nope", "--format", "json"), EXIT_BAD_INPUT)
    _error_object(cli("check", "--json", "--max-bops", "abc"), EXIT_BAD_INPUT, "--max-bops")
    _error_object(cli("profiles", "--json", "--bogus"), EXIT_BAD_INPUT, "No such option")  # click usage errors too
    _error_object(cli("compress", "--json", "--epochs", "abc"), EXIT_BAD_INPUT, "--epochs")
    _error_object(cli("export", tmp_path / "nope", "--json"), EXIT_BAD_INPUT)
    _error_object(cli("verify", tmp_path / "x.onnx", "--json"), EXIT_BAD_INPUT, "not found")
    _error_object(cli("sweep", "m.pt", "--budgets", "speed=1,2", "--json"), EXIT_BAD_INPUT, "--budgets")


def test_without_json_stdout_stays_empty_on_failure(tmp_path: Path) -> None:
    result = cli("report", tmp_path / "nope")
    assert result.exit_code == EXIT_BAD_INPUT and result.stdout == ""


def test_infeasible_exit_3(digits_ckpt: str, tmp_path: Path) -> None:
    result = cli("compress", digits_ckpt, "--arch", ARCH, "--data", "digits", "--budget-bops", "10", "--out",
                 tmp_path / "r", "--json")
    _error_object(result, EXIT_INFEASIBLE, "below the minimum reachable")
    assert not (tmp_path / "r").exists()


def test_check_failure_carries_the_checks(finished_run: Path) -> None:
    result = cli("check", finished_run, "--min-accuracy", "99.99", "--json")
    payload = _error_object(result, EXIT_CHECK_FAILED, "checks failed")
    assert payload["ok"] is False and payload["run"] == str(finished_run)
    failed = [c for c in payload["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["min accuracy"]
    passed = cli("check", finished_run, "--json")
    assert passed.exit_code == 0 and _one_object(passed)["ok"] is True


def test_internal_error_and_interrupt(finished_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(run):
        raise RuntimeError("kaputt")

    monkeypatch.setattr(api, "load_report", boom)
    payload = _error_object(cli("report", finished_run, "--json"), EXIT_INTERNAL, "internal error: RuntimeError: kaputt")
    assert "CGMQ_DEBUG=1" in payload["hint"]

    def interrupt(run):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "load_report", interrupt)
    assert _error_object(cli("report", finished_run, "--json"), EXIT_INTERRUPTED)["error"] == "interrupted"


def test_report_json_flag(finished_run: Path) -> None:
    as_flag = cli("report", finished_run, "--json")
    assert as_flag.exit_code == 0
    assert _one_object(as_flag) == _one_object(cli("report", finished_run, "--format", "json"))
    _error_object(cli("report", finished_run, "--json", "--format", "csv"), EXIT_BAD_INPUT, "two formats")


def test_export_onnx_without_a_path_and_verify_json(run_copy: Path) -> None:
    result = cli("export", run_copy, "--onnx")
    assert result.exit_code == 0, result.output
    assert (run_copy / "model.onnx").is_file() and f"wrote {run_copy / 'model.onnx'}" in result.stdout
    again = cli("export", "--onnx", "--force", run_copy, "--json")  # --onnx then another option: still the default
    assert again.exit_code == 0, again.output
    assert _one_object(again)["onnx"]["path"] == str(run_copy / "model.onnx")
    ok = cli("verify", run_copy / "model.onnx", "--json")
    assert ok.exit_code == 0 and _one_object(ok)["ok"] is True
    over = cli("verify", run_copy / "model.onnx", "--budget-bops", "1", "--json")
    payload = _error_object(over, EXIT_CHECK_FAILED, "over budget: BOPs")
    assert payload["ok"] is False and payload["failures"] == [payload["error"]] and payload["layers"]


def test_inspect_data_and_project_file(digits_ckpt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unknown = cli("inspect", digits_ckpt, "--arch", ARCH)
    one_line_error(unknown, EXIT_BAD_INPUT, "input shape is unknown", "--data")
    with_data = cli("inspect", digits_ckpt, "--arch", ARCH, "--data", "digits", "--json")
    assert with_data.exit_code == 0, with_data.output
    assert [l["name"] for l in _one_object(with_data)["layers"]] == ["features.0", "features.2", "classifier.1",
                                                                     "classifier.3"]
    project = tmp_path / "proj"
    project.mkdir()
    shutil.copy(digits_ckpt, project / "m.pt")
    (project / "cgmq.yaml").write_text(f"model: m.pt\narch: {ARCH}\ndata: digits\n")
    monkeypatch.chdir(project)
    from_yaml = cli("inspect", "--json")  # MODEL, arch and the shape (from data) all from cgmq.yaml
    assert from_yaml.exit_code == 0, from_yaml.output
    assert _one_object(from_yaml) == _one_object(with_data)
    (project / "cgmq.yaml").write_text(f"arch: {ARCH}\ninput_shape: [1, 1, 8, 8]\n")
    assert cli("inspect", "m.pt").exit_code == 0


def test_prints_of_user_code_do_not_corrupt_the_json_on_stdout(digits_ckpt: str, tmp_path: Path) -> None:
    (tmp_path / "loud.py").write_text(
        "from cgmq_cli.models import DigitsCNN\n\n"
        "def make():\n    print('building my model...')\n    return DigitsCNN()\n")
    shown = cli("inspect", digits_ckpt, "--arch", f"{tmp_path}/loud.py:make", "--data", "digits", "--json")
    assert shown.exit_code == 0 and _one_object(shown)["layers"]
    assert "building my model..." in shown.stderr  # still seen, on stderr
    failed = cli("inspect", digits_ckpt, "--arch", f"{tmp_path}/loud.py:make", "--input-shape", "1,1,x", "--json")
    assert _one_object(failed)["exit_code"] == EXIT_BAD_INPUT
