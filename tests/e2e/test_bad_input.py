"""Issue 13, classes 10-15: every bad input gets one clean line (exit 2 unless documented), never exit 1.

(10) check thresholds, (11) flags, (14) project keys, (12) edited or damaged run
directories, (13) operating-system errors, (15) user code that raises or exits.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cgmq_cli import api, atomic, rundir
from cgmq_cli.errors import EXIT_BAD_INPUT, EXIT_INFEASIBLE, EXIT_INTERRUPTED
from cgmq_cli.models import DigitsCNN
from cli_helpers import ARCH, FAST, cli, one_line_error, snapshot

INFEASIBLE = ["--budget-bops", "1000"]  # checked after every flag, model, data and profile: exit 3 proves they passed


def _compress(model: str, out: Path, *extra: str):
    return cli("compress", model, "--arch", ARCH, *FAST, "--out", out, *extra)


def _hinted(result, code: int, *needles: str) -> None:
    one_line_error(result, code, *needles)
    assert "\nhint: " in result.stderr, result.stderr


# -- (10) check thresholds --------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, needle", [
    ("--min-accuracy", "0.95", "did you mean 95?"),
    ("--min-accuracy", "1", "did you mean 100?"),
    ("--min-accuracy", "nan", "from 0 to 100"),
    ("--min-accuracy", "-1", "from 0 to 100"),
    ("--min-accuracy", "200", "from 0 to 100"),
    ("--max-accuracy-drop", "nan", "from 0 to 100"),
    ("--max-accuracy-drop", "-0.5", "from 0 to 100"),
    ("--max-accuracy-drop", "101", "from 0 to 100"),
])
def test_check_thresholds_outside_percent_are_refused(finished_run: Path, flag: str, value: str, needle: str) -> None:
    _hinted(cli("check", finished_run, flag, value), EXIT_BAD_INPUT, flag, needle)


def test_budget_limits_of_check_and_verify_have_the_budgets_bounds(run_copy: Path, tmp_path: Path) -> None:
    _hinted(cli("check", run_copy, "--max-rel-bops", "500"), EXIT_BAD_INPUT, "--max-rel-bops 500", "at most 100")
    _hinted(cli("check", run_copy, "--min-coverage", "150"), EXIT_BAD_INPUT, "coverage is in percent")
    onnx_file = tmp_path / "m.onnx"
    assert cli("export", run_copy, "--onnx", onnx_file).exit_code == 0
    _hinted(cli("verify", onnx_file, "--budget-rel-bops", "101"), EXIT_BAD_INPUT, "--budget-rel-bops 101", "at most 100")
    assert cli("verify", onnx_file, "--budget-rel-bops", "100").exit_code == 0


def test_check_thresholds_inside_percent_are_checked(finished_run: Path) -> None:
    assert cli("check", finished_run, "--min-accuracy", "0", "--max-accuracy-drop", "100").exit_code == 0
    assert cli("check", finished_run, "--max-accuracy-drop", "0.5").exit_code in (0, 4)  # a small drop is plausible
    assert cli("check", finished_run, "--min-accuracy", "100").exit_code == 4


# -- (11) flags ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, needle", [
    ("--lr", "nan", "--lr"), ("--lr", "-1", "--lr"), ("--lr", "inf", "--lr"), ("--lr", "0", "--lr"),
    ("--lr", "lots", "--lr"),
    ("--seed", "-1", "--seed"), ("--seed", "99999999999999999999999", "--seed"),
    ("--epochs", "1000000000000", "--epochs"), ("--epochs", "1e23", "--epochs"),
    ("--gate-steps", "-5", "--gate-steps"), ("--batch-size", "0", "--batch-size"),
    ("--batch-size", "100000", "--batch-size"), ("--subset", "0", "--subset"), ("--workers", "-1", "--workers"),
    ("--workers", "100000", "--workers"), ("--finish", "magic", "--finish"), ("--device", "gpu", "--device"),
    ("--augment", "vflip", "--augment"),
    ("--weight-bits", "4,x", "--weight-bits"), ("--input-shape", "1,1,100000,100000", "--input-shape"),
])
def test_bad_flags(digits_ckpt: str, tmp_path: Path, flag: str, value: str, needle: str) -> None:
    _hinted(_compress(digits_ckpt, tmp_path / "run", *INFEASIBLE, flag, value), EXIT_BAD_INPUT, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("shape", ["1,1,100000,100000", "1,3,2048,2048,64", "1,0,8,8", "8", "1,x,8"])
def test_inspect_input_shape_is_bounded(shape: str) -> None:
    started = time.perf_counter()
    _hinted(cli("inspect", "torchvision:resnet18", "--input-shape", shape), EXIT_BAD_INPUT, "--input-shape")
    assert time.perf_counter() - started < 5


def test_gate_steps_zero_means_one_pass(digits_ckpt: str, tmp_path: Path) -> None:
    result = _compress(digits_ckpt, tmp_path / "run", "--budget-rel-bops", "5", "--gate-steps", "0")
    assert result.exit_code == 0, result.output
    log = (tmp_path / "run" / "train.log").read_text()
    assert "steps=4 " in log and "steps=300" not in log  # 256 examples / batch 64 = one pass of 4 batches


# -- (14) project keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("yaml_text, needle", [
    ("batch_size: 1.5\n", "whole number"),
    ("epochs: abc\n", "epochs"),
    ("epochs: 1e23\n", "epochs"),
    ("lr: .nan\n", "lr"),
    ("seed: true\n", "seed"),
    ("data: 5\n", "data"),
    ("leaf: 5\n", "leaf"),
    ("device: [cpu]\n", "device"),
    ("weight_bits: {a: 1}\n", "weight_bits"),
    ("input_shape: 1\n", "input_shape"),
    ("budgets: [1, 2]\n", "budgets"),
    ("budgets: {bops: lots}\n", "budgets.bops"),
    ("- a\n- b\n", "mapping"),
    ("lr_schedule: linear\n", "lr_schedule"),
    ("measured_fill: maybe\n", "measured_fill"),
    ("measured_exchange: 2\n", "measured_exchange"),
    ("last_gate_fraction: 0\n", "last_gate_fraction"),
    ("distill: -1\n", "distill"),
    ("distill: yes\n", "distill"),
    ("label_smoothing: 1\n", "label_smoothing"),
    ("label_smoothing: -0.1\n", "label_smoothing"),
    ("finish_table: exact\n", "finish_table"),
    ("gate_share: 0\n", "gate_share"),
    ("gate_share: 1.5\n", "gate_share"),
    ("augment: [hflip]\n", "augment"),
    ("augment: rotate\n", "augment"),
    ("weight_bits: 3\n", "weight_bits = 3: 3 is not a bit-width"),  # was blamed on --weight-bits, never passed
    ("act_bits: [4, 5]\n", "5 is not a bit-width"),
    ("profile: nope\n", "profile: unknown profile `nope`"),
])
def test_bad_project_keys(digits_ckpt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, yaml_text: str,
                          needle: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cgmq.yaml").write_text(yaml_text)
    one_line_error(cli("compress", digits_ckpt, "--arch", ARCH, "--data", "digits", *INFEASIBLE), EXIT_BAD_INPUT,
                   "cgmq.yaml", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cgmq.yaml"]


def test_a_dangling_project_file_link_is_an_error_not_no_project_file(digits_ckpt: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cgmq.yaml").symlink_to(tmp_path / "moved" / "cgmq.yaml")
    one_line_error(cli("compress", digits_ckpt, "--arch", ARCH, "--data", "digits", *INFEASIBLE), EXIT_BAD_INPUT,
                   "cgmq.yaml is a symbolic link to a missing file")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS must be unavailable")
def test_mps_where_there_is_none_is_one_line_before_any_run(digits_ckpt: str, tmp_path: Path) -> None:
    one_line_error(_compress(digits_ckpt, tmp_path / "run", "--device", "mps"), EXIT_BAD_INPUT,
                   "--device mps: Apple's Metal (MPS) is not available")  # was an internal error
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the project file's device must be unavailable")
def test_a_project_files_cuda_device_is_named_when_cuda_is_missing(digits_ckpt: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cgmq.yaml").write_text("device: cuda\n")
    one_line_error(cli("compress", digits_ckpt, "--arch", ARCH, "--data", "digits", *INFEASIBLE), EXIT_BAD_INPUT,
                   "cgmq.yaml: device = cuda: CUDA is not available")


def test_the_default_run_name_of_a_long_model_file_name_fits_the_file_system() -> None:
    from cgmq_cli import settings

    for stem in ("m" * 245, "\u00e9" * 200):
        name = Path(settings.default_out(f"{stem}.pt")).name
        assert len(name.encode()) <= 255 and name.startswith(stem[:40])
    assert Path(settings.default_out("torchvision:resnet18", "sweep")).name.startswith("sweep-resnet18-")


def test_label_smoothing_is_refused_beside_a_loss_of_your_own(digits_ckpt: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cgmq.yaml").write_text("label_smoothing: 0.1\n")
    one_line_error(cli("compress", digits_ckpt, "--arch", ARCH, "--data", "digits", "--loss", "torch.nn.functional:nll_loss",
                       *INFEASIBLE), EXIT_BAD_INPUT, "label_smoothing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cgmq.yaml"]


def test_project_keys_accept_yaml_forms(digits_ckpt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cgmq.yaml").write_text("lr: 1e-3\nepochs: '2'\nweight_bits: 8\nact_bits: [4, 8]\n"
                                        "input_shape: [1, 1, 8, 8]\nleaf: []\nbudgets: {bops: 1e3}\n")
    one_line_error(cli("compress", digits_ckpt, "--arch", ARCH, "--data", "digits"), EXIT_INFEASIBLE, "budget bops")


def test_recipe_keys_of_the_project_file_reach_the_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's promise: the recipe's switches can be set in cgmq.yaml."""
    from cgmq_cli.settings import RECIPE_KEYS, resolve_compress

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cgmq.yaml").write_text("lr_schedule: constant\ngate_weights: true\nrecalibrate: true\n"
                                        "gate_eta_decay: true\nlast_gate_fraction: 0.5\nmeasured_fill: false\nepochs_per_round: 3\n"
                                        "distill: 0.5\nmeasured_exchange: true\nlabel_smoothing: 0.2\n"
                                        "finish_table: measured\ngate_share: 0.5\n")
    train = resolve_compress({"model": "m.pt", "data": "digits"}, {"rel_bops": 1.0}).train
    assert {k: getattr(train, k) for k in RECIPE_KEYS} == {
        "lr_schedule": "constant", "gate_weights": True, "recalibrate": True, "gate_eta_decay": True,
        "last_gate_fraction": 0.5, "measured_fill": False, "measured_exchange": True, "epochs_per_round": 3, "distill": 0.5,
        "label_smoothing": 0.2, "finish_table": "measured", "gate_share": 0.5}


# -- (12) edited or damaged run directories ---------------------------------------------------------------


def _edit_json(path: Path, change) -> None:  # noqa: ANN001
    data = json.loads(path.read_text())
    data = change(data)
    path.write_text(json.dumps(data))


CONFIG_EDITS = {
    "extra top-level key": (lambda c: {**c, "extra": 1}, "unknown key"),
    "extra setting": (lambda c: {**c, "settings": {**c["settings"], "turbo": True}}, "unknown setting"),
    "missing settings": (lambda c: {k: v for k, v in c.items() if k != "settings"}, "lacks `settings`"),
    "a list": (lambda c: [c], "is a list"),
    "absurd epochs": (lambda c: {**c, "settings": {**c["settings"], "train": {**c["settings"]["train"],
                                                                               "epochs": 10**12}}}, "epochs"),
    "bad kind": (lambda c: {**c, "source": {**c["source"], "kind": "magic"}}, "source.kind"),
    "bad shape": (lambda c: {**c, "sample_shape": "1x8x8"}, "sample_shape"),
}


@pytest.mark.parametrize("edit", sorted(CONFIG_EDITS))
def test_edited_config_json(run_copy: Path, edit: str) -> None:
    change, needle = CONFIG_EDITS[edit]
    _edit_json(run_copy / "config.json", change)
    _hinted(cli("export", run_copy), EXIT_BAD_INPUT, "config.json", needle)
    (run_copy / "report.json").unlink()
    _hinted(cli("compress", "--resume", run_copy), EXIT_BAD_INPUT, "config.json", needle)


@pytest.mark.parametrize("change, needle", [
    (lambda r: [r], "is a list"),
    (lambda r: {k: v for k, v in r.items() if k != "cost"}, "lacks `cost`"),
    (lambda r: {**r, "cost": {**r["cost"], "bops": "many"}}, "cost.bops"),
    (lambda r: {**r, "layers": [1, 2]}, "layers[0]"),
    (lambda r: {**r, "cost": {**r["cost"], "rel_bops": float("nan")}}, "cost.rel_bops = nan"),
    (lambda r: {**r, "accuracy": {**r["accuracy"], "quantized": float("inf")}}, "accuracy.quantized = inf"),
])
def test_edited_report_json(run_copy: Path, change, needle: str) -> None:  # noqa: ANN001
    _edit_json(run_copy / "report.json", change)
    for args in (["report", run_copy], ["report", run_copy, "--format", "markdown"], ["check", run_copy],
                 ["export", run_copy]):
        _hinted(cli(*args), EXIT_BAD_INPUT, "report.json", needle)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "pickle"])
@pytest.mark.parametrize("name", ["model.pt", "checkpoint.pt"])
def test_damaged_torch_files(run_copy: Path, tmp_path: Path, damage: str, name: str) -> None:
    path = run_copy / name
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(os.urandom(5000))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"state_dict": __import__("collections").OrderedDict(), "x": Path("/")}, path)
    if name == "model.pt":
        _hinted(cli("export", run_copy), EXIT_BAD_INPUT, "model.pt")
    else:
        (run_copy / "report.json").unlink()
        (run_copy / "model.pt").unlink()
        _hinted(cli("compress", "--resume", run_copy), EXIT_BAD_INPUT, "checkpoint.pt")


def test_model_pt_from_another_run(run_copy: Path) -> None:
    saved = torch.load(run_copy / "model.pt", weights_only=True)
    saved["run"] = "0" * 32  # another run's id
    torch.save(saved, run_copy / "model.pt")
    _hinted(cli("export", run_copy), EXIT_BAD_INPUT, "belongs to another run")
    del saved["run"]  # no id (an older cgmq): the state must still fit
    saved["state_dict"] = {k: v[:1] if v.ndim else v for k, v in saved["state_dict"].items()}
    torch.save(saved, run_copy / "model.pt")
    _hinted(cli("export", run_copy), EXIT_BAD_INPUT, "does not fit this run's model")


def test_checkpoint_from_another_run(run_copy: Path) -> None:
    (run_copy / "report.json").unlink()
    ckpt = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    ckpt["run"] = "f" * 32
    torch.save(ckpt, run_copy / "checkpoint.pt")
    _hinted(cli("compress", "--resume", run_copy), EXIT_BAD_INPUT, "belongs to another run")


# -- (13) operating-system errors -----------------------------------------------------------------------


def test_disk_full_during_compress_keeps_the_last_checkpoint(digits_ckpt: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    original = atomic.atomic_write
    seen = {"checkpoint.pt": 0}

    def flaky(path, write):  # noqa: ANN001
        if Path(path).name == "checkpoint.pt":
            seen["checkpoint.pt"] += 1
            if seen["checkpoint.pt"] == 2:  # after epoch 1: torch's own message for a full disk
                def full(p):  # noqa: ANN001
                    Path(p).write_bytes(b"partial")
                    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0; "
                                       "PytorchStreamWriter failed writing file data/0: file write failed")
                return original(path, full)
        return original(path, write)

    monkeypatch.setattr(atomic, "atomic_write", flaky)
    out = tmp_path / "run"
    _hinted(_compress(digits_ckpt, out, "--budget-rel-bops", "5", "--epochs", "2"), EXIT_BAD_INPUT,
            "checkpoint.pt", "cgmq compress --resume")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0  # the previous checkpoint, whole
    assert [p.name for p in out.iterdir() if p.suffix == ".tmp"] == [] and not (out / "report.json").exists()
    monkeypatch.setattr(atomic, "atomic_write", original)
    resumed = cli("compress", "--resume", out, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["epochs"] == 2


def test_disk_full_during_export(run_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd):  # noqa: ANN001
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "x.onnx"
    _hinted(cli("export", run_copy, "--onnx", target), EXIT_BAD_INPUT, str(target), "No space left on device")
    assert list(tmp_path.glob(".cgmq-*")) == [] and not target.exists()


def _read_only_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    original = os.open

    def ro_open(path, flags, *args, **kwargs):  # noqa: ANN001
        if str(path).endswith(rundir.LOCK) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return original(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", ro_open)


def test_read_only_run_directory_on_resume_and_export(run_copy: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _read_only_locks(monkeypatch)
    before = snapshot(run_copy)
    _hinted(cli("export", run_copy), EXIT_BAD_INPUT, "Read-only file system")  # writes into the run: refused
    (run_copy / "report.json").rename(tmp_path / "report.json")
    _hinted(cli("compress", "--resume", run_copy), EXIT_BAD_INPUT, "Read-only file system")
    (tmp_path / "report.json").rename(run_copy / "report.json")
    assert snapshot(run_copy) == before
    elsewhere = cli("export", run_copy, "--onnx", tmp_path / "x.onnx")  # reading a read-only run is fine
    assert elsewhere.exit_code == 0, elsewhere.output
    assert "exporting without a lock" in elsewhere.stderr and snapshot(run_copy) == before


def test_names_too_long_and_parents_that_are_files(run_copy: Path, tmp_path: Path) -> None:
    _hinted(cli("export", run_copy, "--onnx", tmp_path / ("m" * 252 + ".onnx")), EXIT_BAD_INPUT, "File name too long")
    (tmp_path / "afile").write_text("x")
    _hinted(cli("export", run_copy, "--onnx", tmp_path / "afile" / "x.onnx"), EXIT_BAD_INPUT, "is a file")
    _hinted(cli("export", run_copy, "--float", tmp_path / "afile" / "sub" / "f.onnx"), EXIT_BAD_INPUT, "is a file")


def test_an_unexpected_os_error_is_one_line_not_a_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/some/file")

    monkeypatch.setattr(api, "inspect", denied)
    _hinted(cli("inspect", "torchvision:resnet18"), EXIT_BAD_INPUT, "/some/file", "Permission denied")


# -- (15) user code ---------------------------------------------------------------------------------------


@pytest.fixture
def user_code(tmp_path: Path) -> Path:
    code = tmp_path / "user.py"
    code.write_text(
        "import sys, torch\nfrom torch.utils.data import TensorDataset\n"
        "def bad_loss(out, y):\n    raise ValueError('broken loss')\n"
        "def exit_loss(out, y):\n    sys.exit(3)\n"
        "def labels_57():\n    x = torch.rand(64, 1, 8, 8)\n    y = torch.full((64,), 57)\n"
        "    return TensorDataset(x, y), TensorDataset(x, y)\n"
        "def exit_data():\n    sys.exit(3)\n")
    (tmp_path / "exit_arch.py").write_text("import sys\nsys.exit(3)\n")
    return code


@pytest.mark.parametrize("extra, needles", [
    (["--loss", "{u}:bad_loss"], ("bad_loss", "broken loss")),
    (["--loss", "{u}:exit_loss"], ("sys.exit(3)",)),
    (["--data", "{u}:labels_57"], ("Target 57 is out of bounds", "class indices from 0 to 9")),
    (["--data", "{u}:exit_data"], ("sys.exit(3)",)),
    (["--arch", "{d}/exit_arch.py:Net"], ("exit_arch.py", "sys.exit(3)")),
])
def test_user_code_that_raises_or_exits(digits_ckpt: str, tmp_path: Path, user_code: Path, extra: list[str],
                                        needles: tuple[str, ...]) -> None:
    args = [a.format(u=user_code, d=tmp_path) for a in extra]
    result = cli("compress", digits_ckpt, "--arch", ARCH, *FAST, "--budget-rel-bops", "5", "--out", tmp_path / "run", *args)
    one_line_error(result, EXIT_BAD_INPUT, *needles)  # never exit 3 ("infeasible") because user code said so
    assert not (tmp_path / "run").exists()


def test_pt2_with_a_fixed_batch(tmp_path: Path) -> None:
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(DigitsCNN().eval(), (torch.randn(1, 1, 8, 8),)), str(path))
    assert cli("inspect", path).exit_code == 0  # inspecting needs one example only
    _hinted(cli("compress", path, *FAST, "--budget-rel-bops", "5", "--out", tmp_path / "run"), EXIT_BAD_INPUT,
            "fixed batch size of 1", "dynamic batch dimension")


def test_double_ctrl_c_prints_no_traceback(digits_ckpt: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "cgmq_cli", "compress", digits_ckpt, "--arch", ARCH, "--data",
                             "digits", "--out", str(out), "--budget-rel-bops", "2", "--epochs", "3", "--gate-steps",
                             "5000", "--batch-size", "16"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "train.log").exists() and "epoch_start" in (out / "train.log").read_text()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    for _ in range(4):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.03)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert err.strip().splitlines()[-2].startswith("error: interrupted")


def test_a_cost_table_that_cannot_price_the_compute_left_in_float_is_refused_before_the_run(tmp_path: Path) -> None:
    (tmp_path / "ct.py").write_text(
        "from torch import nn\n\nclass CT(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.conv = nn.Conv2d(1, 4, 3, padding=1)\n"
        "        self.up = nn.ConvTranspose2d(4, 4, 3, padding=1)  # not quantized: counted in float (32 x 32)\n"
        "        self.fc = nn.Linear(256, 10)\n\n"
        "    def forward(self, x):\n        return self.fc(self.up(self.conv(x)).flatten(1))\n")
    torch.manual_seed(0)
    sys.path.insert(0, str(tmp_path))
    try:
        state = __import__("ct").CT().state_dict()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ct", None)
    torch.save(state, tmp_path / "ct.pt")
    out = tmp_path / "run"
    result = cli("compress", tmp_path / "ct.pt", "--arch", f"{tmp_path}/ct.py:CT", "--profile", "npu-4-8",
                 "--budget-cost", "1e6", "--data", "digits", "--epochs", "1", "--subset", "128", "--out", out)
    one_line_error(result, EXIT_BAD_INPUT, "cost.table has no entry 32x32")
    assert not out.exists() and "above the cost at the widest" not in result.output


def test_an_unreadable_example_keeps_its_reason(digits_ckpt: str, tmp_path: Path) -> None:
    (tmp_path / "records.py").write_text(
        "import torch\nfrom torch.utils.data import Dataset\n\n"
        "class Records(Dataset):\n    def __len__(self):\n        return 64\n\n"
        "    def __getitem__(self, i):\n        if i == 40:\n            raise OSError('corrupt record 40 in shard-3.bin')\n"
        "        return torch.zeros(1, 8, 8), i % 10\n\n"
        "def fn():\n    return Records(), Records()\n")
    result = cli("compress", digits_ckpt, "--arch", ARCH, "--data", f"{tmp_path}/records.py:fn", "--epochs", "1",
                 "--budget-rel-bops", "5", "--out", tmp_path / "run")
    one_line_error(result, EXIT_BAD_INPUT, "corrupt record 40 in shard-3.bin")  # was only "OSError"


@pytest.mark.parametrize("body, needle", [
    ("return 1.0", "returned a float, not one float number"),
    ("return F.cross_entropy(out, y, reduction='none')", "returned a torch.float32 tensor of shape (64,)"),
    ("return torch.tensor(3)", "returned a torch.int64 tensor of shape ()"),
    ("return F.cross_entropy(out, y).detach()", "detached from the model's output"),
])
def test_a_loss_that_returns_no_trainable_number_is_named(digits_ckpt: str, tmp_path: Path, body: str,
                                                          needle: str) -> None:
    (tmp_path / "odd.py").write_text(f"import torch\nfrom torch.nn import functional as F\n\n"
                                     f"def odd(out, y):\n    {body}\n")
    result = cli("compress", digits_ckpt, "--arch", ARCH, *FAST, "--budget-rel-bops", "5", "--loss",
                 f"{tmp_path}/odd.py:odd", "--out", tmp_path / "run")
    one_line_error(result, EXIT_BAD_INPUT, "--loss", needle)  # was "internal error ... this is a bug in cgmq"
