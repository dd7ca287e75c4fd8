"""A tiny Hugging Face BERT (random weights, built from a config: no download) compresses end to end,
through a factory arch spec and through a .pt2 program; skipped when transformers is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cgmq_cli.cli import app

transformers = pytest.importorskip("transformers")
FIXTURE = Path(__file__).parent / "fixtures" / "tiny_bert.py"
FAST = ["--epochs", "2", "--gate-steps", "10", "--subset", "256", "--batch-size", "64", "--budget-rel-bops", "10"]
runner = CliRunner()


def _fixture():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_bert", FIXTURE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_bert_from_a_factory_arch_spec(tmp_path: Path) -> None:
    state = tmp_path / "bert.pt"
    torch.save(_fixture().make_model().state_dict(), state)
    out = tmp_path / "run"
    result = runner.invoke(app, ["compress", str(state), "--arch", f"{FIXTURE}:make_model", "--data",
                                 f"{FIXTURE}:data", "--out", str(out), "--json", *FAST])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["feasible"] and report["cost"]["rel_bops"] <= 10.0
    ops = {layer["op"] for layer in report["layers"]}
    assert {"embedding", "linear", "matmul"} <= ops  # embeddings, projections and attention products
    assert report["cost"]["coverage"] == 100.0
    assert sum(layer["op"] == "matmul" for layer in report["layers"]) == 4  # 2 layers x (scores, context)


def test_tiny_bert_as_a_pt2_program(tmp_path: Path) -> None:
    model = _fixture().make_model().eval()
    example = torch.randint(0, 64, (2, 16))
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                                  strict=False)
    path = tmp_path / "bert.pt2"
    torch.export.save(program, path)
    inspect = runner.invoke(app, ["inspect", str(path), "--json"])
    assert inspect.exit_code == 0, inspect.output
    totals = json.loads(inspect.stdout)["totals"]
    assert totals["coverage"] == 100.0 and totals["macs"] > 0
