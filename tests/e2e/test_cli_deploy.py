"""`cgmq export` on an integer profile (the integer-kernel guarantee), `--portable`, and `verify --runtime`."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from cgmq_cli.export import diagnose, openvino
from cli_helpers import ARCH, FAST, cli, one_line_error

needs_openvino = pytest.mark.skipif(not openvino.available(), reason="OpenVINO is not installed (pip install openvino)")


@pytest.fixture(scope="module")
def int8_run(digits_ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits run on int8-cpu with every width at 8 (flags narrow the profile)."""
    out = tmp_path_factory.mktemp("int8") / "run"
    result = cli("compress", digits_ckpt, "--arch", ARCH, *FAST, "--profile", "int8-cpu", "--weight-bits", "8",
                 "--act-bits", "8", "--budget-rel-bops", "50", "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def int8_export(int8_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("int8-export") / "m.onnx"
    result = cli("export", int8_run, "--onnx", path, "--json")
    assert result.exit_code == 0, result.output
    return path, json.loads(result.stdout)


@pytest.fixture(scope="module")
def portable_export(finished_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("portable") / "p.onnx"
    result = cli("export", finished_run, "--onnx", path, "--portable")
    assert result.exit_code == 0, result.output
    return path


def test_int8_export_runs_every_layer_as_an_integer_kernel(int8_export: tuple[Path, dict]) -> None:
    kernels = int8_export[1]["onnx"]["integer_kernels"]
    assert [(k["op"], k["kernel"], k["integer"]) for k in kernels] == [
        ("Conv", "QLinearConv", True), ("Conv", "QLinearConv", True), ("MaxPool", "NhwcMaxPool", True),
        ("Gemm", "QGemm", True), ("Gemm", "QGemm", True)]


def _one_float_conv(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime 'leaves' the first conv in float: the CLI contract around a broken promise."""
    real = diagnose.check

    def fake(path, integer_ops):
        found = list(real(path, integer_ops))
        found[0] = diagnose.Finding(node=found[0].node, op="Conv", kind="conv", kernel="Conv",
                                    reason="input 0 (`x`) comes from Min `guard`, not straight from a DequantizeLinear")
        return tuple(found)

    monkeypatch.setattr(diagnose, "check", fake)


def test_a_broken_integer_promise_fails_with_exit_4(int8_run: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _one_float_conv(monkeypatch)
    path = tmp_path / "m.onnx"
    line = one_line_error(cli("export", int8_run, "--onnx", path), 4, "--allow-float-fallback")
    assert "1 of 5 ops that profile int8-cpu runs as integer kernels would run in float" in line
    assert "Conv `features.0` runs as Conv in onnxruntime: input 0 (`x`) comes from Min `guard`" in line
    assert not path.exists()


def test_allow_float_fallback_warns_and_writes(int8_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _one_float_conv(monkeypatch)
    path = tmp_path / "m.onnx"
    result = cli("export", int8_run, "--onnx", path, "--allow-float-fallback")
    assert result.exit_code == 0, result.output
    assert "warning: Conv `features.0` runs as Conv in onnxruntime: input 0" in result.stderr
    assert "integer kernels in onnxruntime: 4 of 5" in result.stdout and path.exists()


def test_portable_export_is_opset_21_and_reads_the_same_bops(finished_run: Path, portable_export: Path,
                                                           tmp_path: Path) -> None:
    assert onnx.load(portable_export).opset_import[0].version == 21
    report = json.loads((finished_run / "report.json").read_text())
    verified = json.loads(cli("verify", portable_export, "--json").stdout)
    assert verified["bops"] == report["cost"]["bops"]
    one_line_error(cli("export", finished_run, "--onnx", tmp_path / "q.onnx", "--portable", "--opset", "25"), 2,
                   "--portable writes opset 21 or older")


@needs_openvino
def test_verify_runtime_openvino_reports_layers_and_parity(portable_export: Path,
                                                           int8_export: tuple[Path, dict]) -> None:
    read = json.loads(cli("verify", portable_export, "--runtime", "openvino", "--json").stdout)["openvino"]
    assert read["agreement"] == 100.0 and all(layer["layer_type"] for layer in read["layers"])
    result = cli("verify", int8_export[0], "--runtime", "openvino")
    assert result.exit_code == 0, result.output
    assert "loads in OpenVINO" in result.stdout and "4 of 4 layers run in int8" in result.stdout
    assert "int8 (Convolution u8)" in result.stdout


def test_verify_runtime_without_openvino_says_how_to_install(finished_run: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openvino, "available", lambda: False)
    one_line_error(cli("verify", finished_run / "model.onnx", "--runtime", "openvino"), 2,
                   "needs OpenVINO, which is not installed", "pip install 'cgmq[openvino]'")
    one_line_error(cli("verify", finished_run / "model.onnx", "--runtime", "tvm"), 2, "--runtime 'tvm'")
