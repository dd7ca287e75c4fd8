"""Start-up is structural here: the fast commands must not import torch and friends (timings: benchmarks/startup.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "numpy", "sklearn", "matplotlib")
PROBE = """
import json, runpy, sys
sys.argv = ["cgmq", *json.loads(sys.argv[1])]
try:
    runpy.run_module("cgmq_cli", run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def _modules(args: list[str], cwd: Path) -> tuple[int, set[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    last = json.loads(done.stderr.strip().splitlines()[-1])
    return last["code"], set(last["modules"])


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import startup
    finally:
        sys.path.pop(0)
    return startup._fixture_run(tmp_path_factory.mktemp("startup"))


@pytest.mark.parametrize("args", [["--help"], ["report", "RUN"], ["report", "RUN", "--format", "json"],
                                  ["check", "RUN"], ["check", "RUN", "--max-bops", "1e12", "--json"], ["profiles"],
                                  ["compress", "--help"], ["report", "--explain", "RUN"]])
def test_fast_commands_do_not_import_torch(args: list[str], hand_run: Path) -> None:
    code, modules = _modules([str(hand_run) if a == "RUN" else a for a in args], hand_run.parent)
    assert code in (0, None, 2), code  # --explain on a run without `tensors` exits 2, still without torch
    top = {m.split(".")[0] for m in modules}
    assert not top & set(HEAVY), sorted(top & set(HEAVY))
    assert "pydantic" not in top  # typer's pydantic coercion is replaced for plain parameter types (cli.py)
    if args[0] != "profiles":
        assert "yaml" not in top


def test_report_into_a_pipe_does_not_load_rich_console(hand_run: Path) -> None:
    code, modules = _modules(["report", str(hand_run)], hand_run.parent)
    assert code in (0, None)
    assert "rich.console" not in modules and "rich.table" not in modules  # render.Grid writes rich's exact text without rich when stdout is not a terminal


def test_compress_imports_torch_when_it_runs(hand_run: Path) -> None:
    """The probe can fail: a command that needs torch does load it (so the test above means something)."""
    code, modules = _modules(["inspect", "torchvision:resnet18", "--json"], hand_run.parent)
    assert code in (0, None) and "torch" in modules
