"""cgmq compress end to end on digits: budgets met, infeasible refused, resume, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cgmq_cli import compress as cmp
from cgmq_cli.cli import app
from cgmq_cli.cost import Budget
from cgmq_cli.errors import EXIT_INFEASIBLE, InterruptedRun
from cgmq_cli.trainer import TrainConfig

ARCH = "cgmq_cli.models:DigitsCNN"
FAST = ["--gate-steps", "60", "--batch-size", "32"]
runner = CliRunner()


def _compress(ckpt: str, out: Path, *args: str) -> dict:
    result = runner.invoke(app, ["compress", ckpt, "--arch", ARCH, "--data", "digits", "--out", str(out), "--json",
                                 *FAST, *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_budget_met_and_report_recomputed(digits_ckpt: str, tmp_path: Path) -> None:
    report = _compress(digits_ckpt, tmp_path / "run", "--budget-rel-bops", "1", "--epochs", "3")
    assert report["feasible"] is True
    assert report["cost"]["rel_bops"] <= 1.0
    # cost is recomputed from the layer widths
    assert report["cost"]["bops"] == sum(l["macs"] * l["bits_w"] * l["bits_a"] for l in report["layers"])
    assert len({(l["bits_w"], l["bits_a"]) for l in report["layers"]}) > 1  # bits really differ per layer
    assert set(report["budget"]) == {"bops", "rel_bops", "weight_bytes", "cost"} and report["budget"]["bops"] is None
    for name in ("model.pt", "report.json", "config.json", "train.log", "checkpoint.pt", "profile.yaml"):
        assert (tmp_path / "run" / name).is_file()
    assert (tmp_path / "latest").resolve() == (tmp_path / "run").resolve()
    # the first gate epoch starts at 32 bits (far over) and ends under the budget
    gate = report["history"][0]
    assert gate["epoch_kind"] == "gate" and gate["max_load"] > 1.0 and gate["load_after_finish"] <= 1.0


def test_combined_budgets_both_met(digits_ckpt: str, tmp_path: Path) -> None:
    report = _compress(digits_ckpt, tmp_path / "run", "--budget-rel-bops", "2", "--budget-weight-bytes", "12000",
                       "--epochs", "2")
    assert report["feasible"]
    assert report["cost"]["rel_bops"] <= 2 and report["cost"]["weight_bytes"] <= 12000


def test_repair_meets_budget_training_alone_would_miss(digits_ckpt: str, tmp_path: Path) -> None:
    # eta so small that the gates cannot reach the budget within the gate epoch
    settings = cmp.CompressSettings(model=digits_ckpt, arch=ARCH, data="digits", out=str(tmp_path / "run"),
                                    budget=Budget(rel_bops=1.0), batch_size=32,
                                    train=TrainConfig(epochs=1, eta=1e-4, gate_steps=20))
    report = cmp.compress(settings).report
    gate = report["history"][0]
    assert gate["load_before_finish"] > 1.0 and gate["repaired"]
    assert report["feasible"] and report["cost"]["rel_bops"] <= 1.0


def test_infeasible_budget_refused_before_training(digits_ckpt: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["compress", digits_ckpt, "--arch", ARCH, "--data", "digits", "--out",
                                 str(tmp_path / "run"), "--budget-rel-bops", "0.1"])
    assert result.exit_code == EXIT_INFEASIBLE
    assert "below the minimum reachable" in result.stderr and "0.42" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_budget_above_float_cost_says_no_quantization_needed(digits_ckpt: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["compress", digits_ckpt, "--arch", ARCH, "--data", "digits", "--out",
                                 str(tmp_path / "run"), "--budget-rel-bops", "100", "--epochs", "1", *FAST])
    assert result.exit_code == 0, result.output
    assert "no quantization is needed" in result.stderr


def test_existing_run_not_overwritten(digits_ckpt: str, tmp_path: Path) -> None:
    _compress(digits_ckpt, tmp_path / "run", "--budget-rel-bops", "4", "--epochs", "1")
    before = (tmp_path / "run" / "report.json").read_bytes()
    result = runner.invoke(app, ["compress", digits_ckpt, "--arch", ARCH, "--data", "digits", "--out",
                                 str(tmp_path / "run"), "--budget-rel-bops", "2"])
    assert result.exit_code == 2 and "already exists" in result.stderr and "--force" in result.stderr
    assert (tmp_path / "run" / "report.json").read_bytes() == before


def test_resume_after_interruption(digits_ckpt: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    settings = cmp.CompressSettings(model=digits_ckpt, arch=ARCH, data="digits", out=str(out),
                                    budget=Budget(rel_bops=1.5), batch_size=32, train=TrainConfig(epochs=4, gate_steps=40))

    def interrupt(event) -> None:
        if event.kind == "epoch_start" and event.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(InterruptedRun, match="keeps the state after epoch 2"):
        cmp.compress(settings, on_event=interrupt)
    assert not (out / "report.json").exists() and not (out / "model.pt").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
    result = runner.invoke(app, ["compress", "--resume", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["feasible"] and report["epochs"] == 4 and len(report["history"]) == 4
    assert "resumed after epoch 2" in (out / "train.log").read_text()


def test_same_seed_same_run(digits_ckpt: str, tmp_path: Path) -> None:
    a = _compress(digits_ckpt, tmp_path / "a", "--budget-rel-bops", "1.5", "--epochs", "2", "--seed", "3")
    b = _compress(digits_ckpt, tmp_path / "b", "--budget-rel-bops", "1.5", "--epochs", "2", "--seed", "3")
    assert a["layers"] == b["layers"] and a["accuracy"] == b["accuracy"]
    sa = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    sb = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_report_formats_and_check(digits_ckpt: str, tmp_path: Path) -> None:
    _compress(digits_ckpt, tmp_path / "run", "--budget-rel-bops", "2", "--epochs", "1")
    run = str(tmp_path / "run")
    md = runner.invoke(app, ["report", run, "--format", "markdown"])
    assert md.exit_code == 0 and md.stdout.startswith("### cgmq run `run`") and "| rel_bops | 2 |" in md.stdout
    js = runner.invoke(app, ["report", run, "--format", "json"])
    assert json.loads(js.stdout)["feasible"] is True
    csv_out = runner.invoke(app, ["report", run, "--format", "csv"]).stdout.splitlines()
    assert csv_out[0] == "layer,op,macs,params,bits_w,bits_a,bops,bops_share,weight_bytes" and len(csv_out) == 5
    ok = runner.invoke(app, ["check", run, "--max-rel-bops", "2", "--min-accuracy", "10"])
    assert ok.exit_code == 0 and ok.stdout.splitlines()[0].startswith("PASS budget rel_bops: ")
    bad = runner.invoke(app, ["check", run, "--min-accuracy", "100"])
    assert bad.exit_code == 4 and "FAIL min accuracy:" in bad.stdout


TIED_PROFILE = """schema_version: 1
name: tied
weight_bits: [4, 8, 16]
act_bits: [8]
input_bits: 8
cost:
  metric: table
  unit: cycles
  table: {"4x8": 0.5, "8x8": 1, "16x8": 1}
"""


class _Hang(BaseException):
    pass


@pytest.mark.parametrize("finish", ["repair-fill", "constraint"])
def test_tied_cost_table_ends_within_budget(digits_ckpt: str, tmp_path: Path, finish: str) -> None:
    """Faults 1 and 2 as a user met them: `--budget-cost 300000` (minimum 168,768) crashed repair with
    'repair found no width to lower', and `--finish constraint` never ended (the cost slope was 0)."""
    import signal

    (tmp_path / "tied.yaml").write_text(TIED_PROFILE)

    def hang(*_):
        raise _Hang()

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(120)
    try:
        report = _compress(digits_ckpt, tmp_path / "run", "--profile", str(tmp_path / "tied.yaml"), "--budget-cost",
                           "300000", "--epochs", "1", "--gate-steps", "5", "--subset", "256", "--finish", finish)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert report["feasible"] and 168768 <= report["cost"]["cost"] <= 300000
    gate = report["history"][0]
    assert gate["load_before_finish"] > 1.0 or gate["max_load"] > 1.0


def test_report_explains_every_tensor(digits_ckpt: str, tmp_path: Path) -> None:
    from cgmq_cli.metrics import METRICS

    report = _compress(digits_ckpt, tmp_path / "run", "--budget-rel-bops", "1", "--budget-weight-bytes", "15000",
                       "--epochs", "2", "--subset", "256")
    entries = report["tensors"]
    assert [e["key"] for e in entries] == sorted({e["key"] for e in entries}, key=[e["key"] for e in entries].index)
    assert len(entries) == 8  # DigitsCNN: 4 weights, 4 inputs (the network input fixed at 8 bits)
    fields = ["key", "label", "kind", "width", "allowed", "gated", "predicted_dloss_up", "predicted_dloss_down",
              "cost_up", "cost_down", "bound_by", "layers"]
    by_layer = {l["name"]: l for l in report["layers"]}
    for e in entries:
        assert list(e) == fields and e["kind"] in ("weight", "act") and e["width"] in e["allowed"]
        assert e["gated"] == (len(e["allowed"]) > 1)
        top, bottom = e["width"] == max(e["allowed"]), e["width"] == min(e["allowed"])
        assert (e["cost_up"] is None) == top and (e["predicted_dloss_up"] is None) == top
        assert (e["cost_down"] is None) == bottom and (e["predicted_dloss_down"] is None) == bottom
        for layer in e["layers"]:  # the width is the one the layer rows carry
            assert by_layer[layer]["bits_w" if e["kind"] == "weight" else "bits_a"] == e["width"]
        if e["cost_up"] is not None:
            assert set(e["cost_up"]) == set(METRICS) and e["cost_up"]["bops"] > 0
            if e["kind"] == "act":
                assert e["cost_up"]["weight_bytes"] == 0
            over = [k for k in ("rel_bops", "weight_bytes") if report["cost"][k] + e["cost_up"][k] > report["budget"][k]]
            assert e["bound_by"] == over
        if e["cost_down"] is not None:
            assert e["cost_down"]["bops"] < 0
    assert entries[0]["label"] == "input of features.0" and not entries[0]["gated"]
    assert any(e["bound_by"] for e in entries)


def test_distillation_learns_from_a_float_model_that_stays_as_loaded(digits_ckpt: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """distill > 0: the weights also match the float model's outputs. The quantized model is built on the float
    model's parameters, so without a copy the teacher would train along with the student."""
    from cgmq_cli import trainer as trainer_mod

    seen: dict = {}
    kl_calls = []
    real_kl = trainer_mod.kl_to_teacher

    def spy(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kl_calls.append(float(real_kl(out, target).detach()))
        return real_kl(out, target)

    real_init = trainer_mod.Trainer.__init__

    def init(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        real_init(self, *args, **kwargs)
        seen["teacher"] = self.teacher

    monkeypatch.setattr(trainer_mod, "kl_to_teacher", spy)
    monkeypatch.setattr(trainer_mod.Trainer, "__init__", init)
    settings = cmp.CompressSettings(model=digits_ckpt, arch=ARCH, data="digits", out=str(tmp_path / "run"),
                                    budget=Budget(rel_bops=1.0), batch_size=32,
                                    train=TrainConfig(epochs=2, gate_steps=20, distill=1.0))
    report = cmp.compress(settings).report
    assert report["feasible"]
    loaded = torch.load(digits_ckpt, weights_only=True)
    teacher = seen["teacher"].state_dict()
    assert teacher.keys() == loaded.keys() and all(torch.equal(teacher[k], loaded[k]) for k in loaded)
    batches = -(-int(0.8 * 1797) // 32)
    assert len(kl_calls) >= batches - 1 and max(kl_calls) > 0  # every weight step, and the 2-bit model differs


def test_no_teacher_without_distillation(digits_ckpt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cgmq_cli import trainer as trainer_mod

    called = []
    monkeypatch.setattr(trainer_mod, "kl_to_teacher", lambda out, target: called.append(1))
    settings = cmp.CompressSettings(model=digits_ckpt, arch=ARCH, data="digits", out=str(tmp_path / "run"),
                                    budget=Budget(rel_bops=1.0), batch_size=32, train=TrainConfig(epochs=2, gate_steps=20))
    assert cmp.compress(settings).report["feasible"] and not called
