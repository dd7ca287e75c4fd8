"""Bad input, training faults and interruptions: clear one-line errors, nothing lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cgmq_cli.cli import app
from cgmq_cli.errors import EXIT_BAD_INPUT, EXIT_INFEASIBLE, EXIT_INTERRUPTED, EXIT_TRAINING_FAILED

ARCH = "cgmq_cli.models:DigitsCNN"
runner = CliRunner()


def _run(*args: str) -> object:
    return runner.invoke(app, list(args))


def _assert_one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1, lines  # progress lines may come first; the error ends the output
    tail = lines[errors[0]:]
    assert len(tail) <= 2 and (len(tail) == 1 or tail[1].startswith("hint: ")), lines
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.stderr, result.stderr


def _compress(ckpt: str, out: Path, *args: str):
    return _run("compress", ckpt, "--arch", ARCH, "--data", "digits", "--out", str(out), "--batch-size", "32",
                "--gate-steps", "30", *args)


# -- profiles and flags --------------------------------------------------------------------------

@pytest.mark.parametrize("yaml_text, needles", [
    ("schema_version: 1\nweight_bits: [2, 4\n", ("invalid YAML",)),
    ("schema_version: 1\nweight_bits: [4, 8]\nact_bits: [8]\nweigth_granularity: per-channel\n", ("did you mean",)),
    ("schema_version: 1\nweight_bits: [3, 8]\nact_bits: [8]\n", ("weight_bits[0]", "3")),
    ("schema_version: 1\nweight_bits: []\nact_bits: [8]\n", ("weight_bits",)),
    ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\nbudgets: {rel_bops: -1}\n", ("budgets.rel_bops", "-1")),
    ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\nbudgets: {bops: .nan}\n", ("budgets.bops", "nan")),
    ("weight_bits: [8]\nact_bits: [8]\n", ("schema_version",)),
])
def test_bad_profiles(digits_ckpt: str, tmp_path: Path, yaml_text: str, needles: tuple[str, ...]) -> None:
    profile = tmp_path / "hw.yaml"
    profile.write_text(yaml_text)
    result = _compress(digits_ckpt, tmp_path / "run", "--profile", str(profile), "--budget-rel-bops", "2")
    _assert_one_line_error(result, EXIT_BAD_INPUT, str(profile), *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value, needle", [
    ("--budget-rel-bops", "0", "positive"),
    ("--budget-bops", "-5", "positive"),
    ("--budget-bops", "nan", "positive"),
    ("--budget-bops", "lots", "not a number"),
    ("--budget-rel-bops", "150", "at most 100"),
    ("--weight-bits", "3", "3"),
    ("--epochs", "0", "--epochs"),
])
def test_bad_flags(digits_ckpt: str, tmp_path: Path, flag: str, value: str, needle: str) -> None:
    args = [flag, value] if flag.startswith("--budget") else [flag, value, "--budget-rel-bops", "2"]
    _assert_one_line_error(_compress(digits_ckpt, tmp_path / "run", *args), EXIT_BAD_INPUT, needle)


def test_flag_outside_profile_is_refused(digits_ckpt: str, tmp_path: Path) -> None:
    result = _compress(digits_ckpt, tmp_path / "run", "--profile", "npu-4-8", "--weight-bits", "2",
                       "--budget-cost", "1e5")
    _assert_one_line_error(result, EXIT_BAD_INPUT, "--weight-bits")


def test_conflicting_flags(digits_ckpt: str, tmp_path: Path) -> None:
    _assert_one_line_error(_run("compress", "--resume", str(tmp_path), "--epochs", "3"), EXIT_BAD_INPUT, "--resume")
    _assert_one_line_error(_compress(digits_ckpt, tmp_path / "r", "--budget-cost", "10"), EXIT_BAD_INPUT,
                           "--budget-cost needs a profile with a cost table")


def test_no_budget_and_no_data(digits_ckpt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _assert_one_line_error(_run("compress", digits_ckpt, "--arch", ARCH), EXIT_BAD_INPUT, "no training data", "--data")
    _assert_one_line_error(_run("compress", digits_ckpt, "--arch", ARCH, "--data", "digits"), EXIT_BAD_INPUT,
                           "no budget given")


def test_infeasible_names_minimum(digits_ckpt: str, tmp_path: Path) -> None:
    _assert_one_line_error(_compress(digits_ckpt, tmp_path / "run", "--budget-bops", "1000"), EXIT_INFEASIBLE,
                           "minimum reachable 1.46074e+06")


def test_project_file_supplies_settings(digits_ckpt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cgmq.yaml").write_text(textwrap.dedent(f"""
        arch: {ARCH}
        data: digits
        epochs: 1
        batch_size: 32
        budgets: {{rel_bops: 3}}
        out: runs/from-project
    """))
    result = _run("compress", digits_ckpt, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["budget"]["rel_bops"] == 3
    assert (tmp_path / "runs" / "from-project" / "report.json").is_file()
    (tmp_path / "cgmq.yaml").write_text("dta: digits\n")
    _assert_one_line_error(_run("compress", digits_ckpt), EXIT_BAD_INPUT, "did you mean `data`")


# -- data --------------------------------------------------------------------------------------------

def test_data_errors(digits_ckpt: str, tmp_path: Path) -> None:
    bad_fn = tmp_path / "bad_data.py"
    bad_fn.write_text("def make():\n    raise RuntimeError('no disk')\n")
    empty_fn = tmp_path / "empty_data.py"
    empty_fn.write_text("import torch\nfrom torch.utils.data import TensorDataset\n"
                        "def make():\n    e = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))\n"
                        "    return e, e\n")
    budget = ("--budget-rel-bops", "2")
    cases = [
        (["--data", f"fashion-mnist:{tmp_path / 'nowhere'}"], "nowhere"),
        (["--data", f"{bad_fn}:make"], "no disk"),
        (["--data", f"{empty_fn}:make"], "empty"),
        (["--data", "mnist", "--arch", "torchvision:resnet18"], None),
    ]
    for extra, needle in cases[:3]:
        result = _run("compress", digits_ckpt, "--arch", ARCH, "--out", str(tmp_path / "run"), *budget, *extra)
        _assert_one_line_error(result, EXIT_BAD_INPUT, needle)
    # wrong image size / channels for the model: a 3-channel model on 1-channel digits
    wrong = tmp_path / "rgb.py"
    wrong.write_text("from torch import nn\ndef Net():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))\n")
    torch.save(__import__("runpy").run_path(str(wrong))["Net"]().state_dict(), tmp_path / "rgb.pt")
    result = _run("compress", str(tmp_path / "rgb.pt"), "--arch", f"{wrong}:Net", "--data", "digits",
                  "--out", str(tmp_path / "run"), *budget)
    _assert_one_line_error(result, EXIT_BAD_INPUT, "does not accept inputs of shape (1, 1, 8, 8)")
    assert not (tmp_path / "run").exists()


# -- training faults, outputs, environment ---------------------------------------------------------

def test_nan_loss_skipped_then_aborts_keeping_checkpoint(digits_ckpt: str, tmp_path: Path) -> None:
    loss = tmp_path / "nanloss.py"
    loss.write_text(textwrap.dedent("""
        import torch
        from torch.nn import functional as F
        calls = {"n": 0}
        def sometimes(out, y):  # NaN for two batches of the gate epoch (12 calls go to the float evaluation)
            calls["n"] += 1
            return F.cross_entropy(out, y) * (float("nan") if calls["n"] in (20, 21) else 1.0)
        def always(out, y):
            return F.cross_entropy(out, y) * float("nan")
    """))
    ok = _compress(digits_ckpt, tmp_path / "ok", "--loss", f"{loss}:sometimes", "--epochs", "1",
                   "--budget-rel-bops", "2")
    assert ok.exit_code == 0, ok.output
    assert "non-finite loss, batch skipped (2 so far)" in ok.stderr
    bad = _compress(digits_ckpt, tmp_path / "bad", "--loss", f"{loss}:always", "--epochs", "2", "--budget-rel-bops", "2")
    _assert_one_line_error(bad, EXIT_TRAINING_FAILED, "NaN/inf in 20 batches in a row")
    assert torch.load(tmp_path / "bad" / "checkpoint.pt", weights_only=True)["epoch"] == 0
    assert not (tmp_path / "bad" / "report.json").exists()
    few = _compress(digits_ckpt, tmp_path / "few", "--loss", f"{loss}:always", "--epochs", "1", "--budget-rel-bops",
                    "2", "--subset", "256", "--gate-steps", "5")  # fewer batches than the 20-in-a-row bound
    _assert_one_line_error(few, EXIT_TRAINING_FAILED, "every batch's loss in epoch 1 was NaN/inf")
    assert not (tmp_path / "few" / "report.json").exists()  # it used to finish with exit 0 and an accuracy


def test_unwritable_output_fails_before_training(digits_ckpt: str, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    started = time.time()
    result = _compress(digits_ckpt, blocker / "run", "--budget-rel-bops", "2")
    _assert_one_line_error(result, EXIT_BAD_INPUT, "cannot write to run directory")
    assert time.time() - started < 20


def test_force_only_replaces_runs(digits_ckpt: str, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    result = _compress(digits_ckpt, precious, "--budget-rel-bops", "2", "--force")
    _assert_one_line_error(result, EXIT_BAD_INPUT, "not a cgmq run directory")
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_cuda_without_cuda(digits_ckpt: str, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _assert_one_line_error(_compress(digits_ckpt, tmp_path / "run", "--device", "cuda", "--budget-rel-bops", "2"),
                           EXIT_BAD_INPUT, "CUDA is not available")


def test_more_workers_than_cores(digits_ckpt: str, tmp_path: Path) -> None:
    result = _compress(digits_ckpt, tmp_path / "run", "--workers", str((os.cpu_count() or 2) + 2), "--epochs", "1",
                       "--budget-rel-bops", "3", "--subset", "256")
    assert result.exit_code == 0, result.output


def test_traceback_only_with_debug(digits_ckpt: str, tmp_path: Path) -> None:
    env = {**os.environ, "CGMQ_DEBUG": "1"}
    proc = subprocess.run([sys.executable, "-m", "cgmq_cli", "compress", str(tmp_path / "missing.pt"), "--data",
                           "digits", "--budget-rel-bops", "1"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "cgmq_cli", "compress", str(tmp_path / "missing.pt"), "--data",
                           "digits", "--budget-rel-bops", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: model file not found")


# -- signals ---------------------------------------------------------------------------------------

def _start(ckpt: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cgmq_cli", "compress", ckpt, "--arch", ARCH, "--data", "digits",
                             "--out", str(out), "--budget-rel-bops", "1.5", "--epochs", "3", "--gate-steps", "300",
                             "--batch-size", "16", "--subset", "512"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, needle: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and needle in path.read_text():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} never appeared in {path}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_epoch_leaves_resumable_run(digits_ckpt: str, tmp_path: Path, sig: int) -> None:
    out = tmp_path / "run"
    proc = _start(digits_ckpt, out)
    _wait_for(out / "train.log", "epoch=1 epoch_start", proc)  # the gate epoch (300 steps)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "cgmq compress --resume" in err and "Traceback" not in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0  # the state before epoch 1
    result = _run("compress", "--resume", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["feasible"] and report["epochs"] == 3 and len(report["history"]) == 3


def test_sigkill_never_leaves_half_written_files(digits_ckpt: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(digits_ckpt, out)
    _wait_for(out / "train.log", "epoch=2 epoch_start", proc)
    proc.kill()
    proc.communicate(timeout=30)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # complete and loadable
    assert ckpt["epoch"] in (1, 2)
    assert json.loads((out / "config.json").read_text())["settings"]["data"] == "digits"
    assert not (out / "report.json").exists() and not (out / "model.pt").exists()


# -- property: random profiles and budgets ---------------------------------------------------------

def test_random_profiles_and_budgets_end_within_budget_or_refuse(tmp_path: Path) -> None:
    """Random width sets, cost tables with ties, mixed budgets of which exactly one is violated where the
    finish starts, both finishes: every run ends within budget (or the budget is refused as infeasible
    before training), and every finish returns (a hang fails through the alarm)."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from cgmq_cli import qmodel
    from cgmq_cli.compress import check_budget
    from cgmq_cli.cost import Budget, extreme_cost
    from cgmq_cli.errors import InfeasibleBudgetError
    from cgmq_cli.profiles import VALID_BITS, HardwareProfile
    from cgmq_cli.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    widths = st.lists(st.sampled_from([2, 4, 8, 16, 32]), min_size=1, max_size=5, unique=True)
    levels = st.lists(st.integers(0, 2), min_size=5, max_size=5).map(sorted)  # non-decreasing: ties are common
    tables = st.tuples(levels, levels).map(lambda la: {
        (bw, ba): 0.25 * (1 + la[0][i]) * (1 + la[1][j]) for i, bw in enumerate(VALID_BITS) for j, ba in enumerate(VALID_BITS)})
    table = st.integers(0, 1).flatmap(lambda t: tables if t else st.none())

    class Hang(BaseException):
        pass

    def hang(*_):
        raise Hang()

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(w=widths, a=widths, cost_table=table, data=st.data())
    def check(w, a, cost_table, data):
        profile = HardwareProfile(name="random", weight_bits=tuple(w), act_bits=tuple(a), cost_table=cost_table)
        mac_cost = profile.mac_cost if cost_table else None
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        qm = qmodel.prepare(model, (12,), widths_for=profile.widths_for, input_bits=8)
        qm.calibrate(x)
        qm.set_widths({k: data.draw(st.sampled_from(q.allowed)) for k, q in qm.tensor_quantizers().items()})
        now = qm.cost(mac_cost).as_dict()
        keys = ["rel_bops", "weight_bytes", "bops"] + (["cost"] if cost_table else [])
        chosen = data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=len(keys), unique=True))
        limits = {k: now[k] * data.draw(st.floats(1.0, 3.0)) for k in chosen[1:]}  # met where the finish starts
        low = extreme_cost(qm.shapes, qm.allowed(), mac_cost).as_dict()[chosen[0]]
        # the one violated: mostly between the reachable minimum and now, sometimes below the minimum
        limits[chosen[0]] = low + (now[chosen[0]] - low) * data.draw(st.floats(-0.2, 0.999))
        if limits.get("rel_bops", 0) > 100 or not all(v > 0 for v in limits.values()) or now[chosen[0]] <= low:
            return
        budget = Budget(**limits)
        try:
            check_budget(qm, budget, profile)
        except InfeasibleBudgetError:
            return
        config = TrainConfig(finish=data.draw(st.sampled_from(["repair-fill", "constraint"])), probe_batches=2,
                             measured_fill=data.draw(st.booleans()), measured_exchange=data.draw(st.booleans()))
        trainer = Trainer(qm, loader, loader, budget, config, mac_cost)
        assert list(trainer.costs.violated(qm.widths())) == [chosen[0]]
        signal.signal(signal.SIGALRM, hang)
        signal.alarm(30)
        try:
            info = trainer.finish(0)
        finally:
            signal.alarm(0)
        assert budget.is_satisfied_by(qm.cost(mac_cost)) and info["load_after_finish"] <= 1.0
        assert all(m["predicted_dloss"] < 0 for m in info["filled"])

    check()


# -- property: random flag values and project keys ------------------------------------------------

def _pools():
    """(value, valid) choices for every numeric flag and project key: out of range and wrong types included."""
    from hypothesis import strategies as st

    from cgmq_cli.settings import INT_RANGES

    def integer(key: str):
        low, high = INT_RANGES[key]
        ints = st.integers(-10**12, 10**12).map(lambda v: (v, low <= v <= high))
        odd = st.sampled_from([(2**70, False), ("abc", False), ("", False), ("1.5", False), ("nan", False),
                               ("1e3", False), (str(low), True), (high, True)])
        return st.one_of(ints, odd)

    lr = st.one_of(st.floats(-10, 20, allow_nan=False).map(lambda v: (v, 0 < v <= 10)),
                   st.sampled_from([("nan", False), ("inf", False), ("-inf", False), ("0", False), ("1e400", False),
                                    ("lots", False), ("1e-3", True), (1e-3, True)]))
    bits = st.sampled_from([("4,8", True), ([2, 16], True), (8, True), ("3", False), ("4,x", False), ([True], False),
                            ({"a": 1}, False)])
    shape = st.sampled_from([("1,1,8,8", True), ([1, 1, 8, 8], True), ("1,x", False), (1, False), ([0, 1], False),
                             ("1,1,100000,100000", False)])
    text = st.sampled_from([(5, False), ([1], False), ({"a": 1}, False), (True, False)])
    return {
        "epochs": integer("epochs"), "batch_size": integer("batch_size"), "subset": integer("subset"),
        "seed": integer("seed"), "workers": integer("workers"), "gate_steps": integer("gate_steps"), "lr": lr,
        "weight_bits": bits, "act_bits": bits, "input_shape": shape,
        "device": st.sampled_from([("cpu", True), ("gpu", False), ("", False)]) | text,
        "finish": st.sampled_from([("repair-fill", True), ("constraint", True), ("magic", False)]),
        "leaf": st.sampled_from([(5, False), ([1, 2], False)]),
        "data": st.sampled_from([("digits", True)]) | text,
    }


FLAG_ONLY = ("gate_steps", "finish")  # compress flags that are not project keys
PROJECT_ONLY = ("leaf",)  # tested as a project key only (a valid --leaf needs a real submodule)


def test_random_flags_and_project_keys_exit_cleanly(digits_ckpt: str, tmp_path: Path) -> None:
    """Any mix of flag values and cgmq.yaml keys: exit 2 naming a bad one (one line), or exit 3 from the
    always-infeasible budget when all are valid; never exit 1, never a file written or changed outside --out."""
    import yaml
    from hypothesis import HealthCheck, given, settings, strategies as st

    pools = _pools()
    keys = sorted(pools)
    counter = {"n": 0}

    @settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(flags=st.fixed_dictionaries({}, optional={k: pools[k] for k in keys if k not in PROJECT_ONLY}),
           project=st.fixed_dictionaries({}, optional={k: pools[k] for k in keys if k not in FLAG_ONLY}))
    def check(flags, project):
        counter["n"] += 1
        work = tmp_path / f"ex{counter['n']}"
        work.mkdir()
        if project:
            (work / "cgmq.yaml").write_text(yaml.safe_dump({k: v for k, (v, _) in project.items()}))
        args = ["compress", digits_ckpt, "--arch", ARCH, "--out", str(work / "out"), "--budget-bops", "1000"]
        for key, (value, _) in flags.items():
            args += ["--" + key.replace("_", "-"), value if isinstance(value, str) else
                     ",".join(map(str, value)) if isinstance(value, list) else str(value)]
        bad = [k for k, (_, ok) in flags.items() if not ok] + [k for k, (_, ok) in project.items() if not ok]
        if "data" not in project and "data" not in flags:
            args += ["--data", "digits"]
        before = snapshot_dir(work)
        cwd = os.getcwd()
        os.chdir(work)
        try:
            result = runner.invoke(app, args)
        finally:
            os.chdir(cwd)
        assert result.exit_code in (0, 2, 3), (args, project, result.output)
        assert snapshot_dir(work) == before and not (work / "out").exists()
        if bad:
            error = _assert_one_line_error_line(result, EXIT_BAD_INPUT)
            assert any(k in error or k.replace("_", "-") in error for k in bad), (bad, error)
        else:
            assert result.exit_code == EXIT_INFEASIBLE, (args, project, result.output)

    check()


def snapshot_dir(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


def _assert_one_line_error_line(result, code: int) -> str:
    _assert_one_line_error(result, code)
    return next(line for line in result.stderr.splitlines() if line.startswith("error: "))
