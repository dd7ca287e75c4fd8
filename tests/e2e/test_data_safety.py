"""Issue 13, classes 5-9 and 16: nothing the user owns is deleted, replaced or left half-written.

(5) --force rules, (6) one writer per run directory, (7) ``latest``, (8) export's
outputs and the demo's, (9) signals and stale temporaries, (16) no empty shells,
--resume of a finished run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import onnx
import torch
import pytest

from cgmq_cli import atomic, rundir
from cgmq_cli.errors import EXIT_BAD_INPUT, EXIT_INFEASIBLE, EXIT_INTERRUPTED
from cli_helpers import ARCH, FAST, cli, one_line_error, snapshot


def _compress(model: str, out: Path, *extra: str):
    return cli("compress", model, "--arch", ARCH, *FAST, "--budget-rel-bops", "5", "--out", out, *extra)


def _temporaries(*folders: Path) -> list[Path]:
    return [p for f in folders if f.is_dir() for p in f.iterdir() if p.name.startswith(".cgmq-") and p.suffix == ".tmp"]


# -- (5) --force -------------------------------------------------------------------------------------


def test_force_refuses_a_folder_that_merely_holds_config_json(digits_ckpt: str, tmp_path: Path) -> None:
    hf = tmp_path / "hf-model"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "bert"}')
    (hf / "pytorch_model.bin").write_bytes(b"weights worth a week of GPU time")
    before = snapshot(hf)
    one_line_error(_compress(digits_ckpt, hf, "--force"), EXIT_BAD_INPUT, "not a cgmq run directory")
    assert snapshot(hf) == before


@pytest.mark.parametrize("out", [".", "..", "../.."])
def test_force_never_replaces_the_working_directory_or_its_parents(digits_ckpt: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, out: str) -> None:
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    one_line_error(_compress(digits_ckpt, Path(out), "--force"), EXIT_BAD_INPUT, "working directory")
    assert (work / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["model", "profile", "arch"])
def test_force_never_deletes_an_input(run_copy: Path, digits_ckpt: str, tmp_path: Path, where: str) -> None:
    model = run_copy / "input.pt" if where == "model" else Path(digits_ckpt)
    if where == "model":
        shutil.copy(digits_ckpt, model)
    extra: list[str] = []
    if where == "profile":
        (run_copy / "hw.yaml").write_text("schema_version: 1\nweight_bits: [4, 8]\nact_bits: [8]\n")
        extra = ["--profile", str(run_copy / "hw.yaml")]
    if where == "arch":
        (run_copy / "net.py").write_text("from cgmq_cli.models import DigitsCNN as Net\n")
        extra = ["--arch", f"{run_copy / 'net.py'}:Net"]
    before = snapshot(run_copy)
    one_line_error(_compress(str(model), run_copy, "--force", *extra), EXIT_BAD_INPUT, "an input of this run")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("bad", [["--lr", "nan"], ["--epochs", "0"], ["--weight-bits", "3"], ["--data", "nonesuch"],
                                 ["--budget-bops", "1000"]])
def test_force_validates_everything_before_deleting(run_copy: Path, digits_ckpt: str, bad: list[str]) -> None:
    before = snapshot(run_copy)
    result = _compress(digits_ckpt, run_copy, "--force", *bad)
    assert result.exit_code in (2, 3), result.output
    assert snapshot(run_copy) == before


def test_force_refuses_a_symlink(run_copy: Path, digits_ckpt: str, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(run_copy, target_is_directory=True)
    before = snapshot(run_copy)
    one_line_error(_compress(digits_ckpt, link, "--force"), EXIT_BAD_INPUT, "symbolic link")
    assert snapshot(run_copy) == before and link.is_symlink()


def test_force_replaces_a_marked_run_and_leaves_a_foreign_latest_alone(run_copy: Path, digits_ckpt: str) -> None:
    (run_copy / "old-export.onnx").write_bytes(b"from the previous run")
    old_id = rundir.run_id(run_copy)
    latest = run_copy.parent / "latest"
    latest.write_text("my own notes, not a pointer\n")
    result = _compress(digits_ckpt, run_copy, "--force")
    assert result.exit_code == 0, result.output
    assert not (run_copy / "old-export.onnx").exists() and (run_copy / "report.json").is_file()
    assert rundir.run_id(run_copy) not in (None, old_id)
    assert latest.read_text() == "my own notes, not a pointer\n"
    assert f"note: left {latest} alone: it is not a pointer cgmq made" in result.stderr


def test_compress_points_latest_at_the_run(finished_run: Path) -> None:
    latest = finished_run.parent / "latest"
    assert latest.is_symlink() and os.readlink(latest) == finished_run.name
    marker = json.loads((finished_run / ".cgmq-run").read_text())
    assert marker["format"] == "cgmq-run/1" and marker["path"] == str(finished_run.resolve())


# -- (6) one writer at a time ----------------------------------------------------------------------------


def test_a_second_writer_is_refused(run_copy: Path, digits_ckpt: str) -> None:
    before = snapshot(run_copy, skip=(run_copy / ".cgmq-lock",))
    with rundir.locked(run_copy):  # as a running compress holds it
        one_line_error(_compress(digits_ckpt, run_copy, "--force"), EXIT_BAD_INPUT, "in use by another cgmq process")
        one_line_error(cli("export", run_copy), EXIT_BAD_INPUT, "in use by another cgmq process")
        (run_copy / "report.json").rename(run_copy / "report.keep")
        one_line_error(cli("compress", "--resume", run_copy), EXIT_BAD_INPUT, "in use by another cgmq process")
        (run_copy / "report.keep").rename(run_copy / "report.json")
    assert snapshot(run_copy, skip=(run_copy / ".cgmq-lock",)) == before


# -- (7) latest --------------------------------------------------------------------------------------


@pytest.mark.parametrize("latest", ["file", "dir", "symlink-out", "txt-out"])
def test_latest_is_only_followed_when_cgmq_made_it(run_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   latest: str) -> None:
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run_copy, elsewhere)  # a real run, but not beside runs/latest
    if latest == "file":
        (runs / "latest").write_text("r\n")
    elif latest == "dir":
        (runs / "latest").mkdir()
    elif latest == "symlink-out":
        (runs / "latest").symlink_to(elsewhere, target_is_directory=True)
    else:
        (runs / "latest.txt").write_text("../elsewhere\n")
    one_line_error(cli("report"), EXIT_BAD_INPUT, "latest")
    one_line_error(cli("check"), EXIT_BAD_INPUT, "latest")


def test_latest_txt_written_by_cgmq_is_followed(run_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "latest.txt").write_text("r\n")
    result = cli("report", "--format", "json")
    assert result.exit_code == 0 and json.loads(result.stdout)["run"] == "base"


# -- (8) export's and the demo's outputs ----------------------------------------------------------------


def test_export_refuses_the_same_path_twice(run_copy: Path, tmp_path: Path) -> None:
    target = tmp_path / "x.onnx"
    one_line_error(cli("export", run_copy, "--onnx", target, "--float", target), EXIT_BAD_INPUT, "same file")
    assert not target.exists()


@pytest.mark.parametrize("name", ["report.json", "model.pt", "config.json", "checkpoint.pt", "train.log", "notes.txt"])
def test_export_never_writes_over_run_files(run_copy: Path, name: str) -> None:
    target = run_copy / name
    if not target.exists():
        target.write_text("mine")
    before = snapshot(run_copy)
    one_line_error(cli("export", run_copy, "--onnx", target, "--force"), EXIT_BAD_INPUT, "file of the run directory")
    one_line_error(cli("export", run_copy, "--float", target, "--force"), EXIT_BAD_INPUT, "file of the run directory")
    assert snapshot(run_copy) == before


def test_export_writes_normal_permissions_and_cleans_stale_temporaries(run_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dead = [run_copy / ".cgmq-4999999-abc.tmp", out / ".cgmq-4999998-def.tmp"]  # pids that cannot exist
    alive = out / f".cgmq-{os.getpid()}-ghi.tmp"  # a live writer's temporary is left alone
    for path in (*dead, alive):
        path.write_bytes(b"half a file")
    name = "m" * 245 + ".onnx"  # a legal 250-character name (the temporary's name stays short)
    result = cli("export", run_copy, "--onnx", out / name)
    assert result.exit_code == 0, result.output
    assert onnx.load(str(out / name)).producer_name == "cgmq"
    assert not any(p.exists() for p in dead) and alive.exists()
    mode = stat.S_IMODE((out / name).stat().st_mode)
    assert mode == stat.S_IMODE((run_copy / "report.json").stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("name", ["report.json", "notes.txt"])
def test_report_plot_never_replaces_other_files(run_copy: Path, name: str) -> None:
    target = run_copy / name
    if not target.exists():
        target.write_text("mine")
    before = snapshot(run_copy)
    one_line_error(cli("report", run_copy, "--plot", target), EXIT_BAD_INPUT, "not a PNG image")
    assert snapshot(run_copy) == before


def test_demo_never_overwrites_its_float_folder_without_force(tmp_path: Path) -> None:
    out = tmp_path / "D"
    float_dir = tmp_path / "D-float"
    float_dir.mkdir()
    (float_dir / "digits_cnn.pt").write_text("my own model")
    one_line_error(cli("demo", "--out", out), EXIT_BAD_INPUT, "already exists", "--force")
    one_line_error(cli("demo", "--out", out, "--force"), EXIT_BAD_INPUT, "not made by `cgmq demo`")
    assert (float_dir / "digits_cnn.pt").read_text() == "my own model" and not out.exists()


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--epochs", "100000"), ("--budget-rel-bops", "nan"),
                                         ("--budget-rel-bops", "150")])
def test_demo_validates_its_flags_first(tmp_path: Path, flag: str, value: str) -> None:
    one_line_error(cli("demo", "--out", tmp_path / "D", flag, value), EXIT_BAD_INPUT, flag)
    assert list(tmp_path.iterdir()) == []


def test_demo_refuses_an_unreachable_budget_before_it_trains_or_writes(tmp_path: Path) -> None:
    one_line_error(cli("demo", "--out", tmp_path / "D", "--budget-rel-bops", "0.0001"), EXIT_INFEASIBLE,
                   "below the minimum reachable")
    assert list(tmp_path.iterdir()) == []  # the float model's folder used to stay and block the next demo


# -- (9) signals and stale temporaries --------------------------------------------------------------------


def test_an_interrupt_that_surfaces_as_another_error_is_still_an_export_interrupt(
        run_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SIGTERM test below once caught the export inside onnxruntime's import: the handler's KeyboardInterrupt
    came out as "ImportError: initialization failed" and cgmq printed an internal error (exit 1)."""
    from cgmq_cli import deploy, errors

    def interrupted_in_an_import(*_a, **_k):
        errors.SIGNALLED["seen"] = True  # as the signal handler records it
        raise ImportError("initialization failed")

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(deploy, "_export", interrupted_in_an_import)
    try:
        result = cli("export", run_copy, "--onnx", tmp_path / "x.onnx")
    finally:
        for sig, handler in saved.items():  # cgmq ignores further signals once interrupted
            signal.signal(sig, handler)
        errors.SIGNALLED["seen"] = False
    one_line_error(result, EXIT_INTERRUPTED, "export interrupted")
    assert not (tmp_path / "x.onnx").exists() and _temporaries(tmp_path, run_copy) == []


def test_sigterm_during_export_exits_130_and_leaves_no_temporary(run_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "cgmq_cli", "export", str(run_copy), "--onnx", str(out / "x.onnx"),
                             "--float", str(out / "f.onnx")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not _temporaries(out):
        time.sleep(0.005)
    assert proc.poll() is None, proc.communicate()  # the export was caught while writing a file
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "error: export interrupted" in err and "Traceback" not in err
    assert _temporaries(out, run_copy) == []
    for name in ("x.onnx", "f.onnx"):  # a file is either complete or absent
        if (out / name).exists():
            assert onnx.load(str(out / name)).producer_name == "cgmq"


# -- (16) no empty shells; --resume of a finished run -----------------------------------------------------


def test_a_refused_run_leaves_no_directory(digits_ckpt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = atomic.atomic_write

    def full_disk(path, write):  # noqa: ANN001
        if Path(path).name == "config.json":
            raise rundir.os_error(OSError(28, os.strerror(28)), path)
        return original(path, write)

    monkeypatch.setattr(atomic, "atomic_write", full_disk)
    out = tmp_path / "new" / "deep" / "run"
    one_line_error(_compress(digits_ckpt, out), EXIT_BAD_INPUT, "No space left on device", "config.json")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(atomic, "atomic_write", original)
    loss = tmp_path / "loss.py"
    loss.write_text("def bad(out, y):\n    raise ValueError('broken loss')\n")
    one_line_error(_compress(digits_ckpt, out, "--loss", f"{loss}:bad"), EXIT_BAD_INPUT, "broken loss")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.py"]


def test_resume_of_a_finished_run_says_so(run_copy: Path) -> None:
    before = snapshot(run_copy)
    one_line_error(cli("compress", "--resume", run_copy), EXIT_BAD_INPUT, "is finished", "cgmq report")
    assert snapshot(run_copy) == before


def test_force_keeps_the_replaced_run_until_the_new_one_finishes(digits_ckpt: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from cgmq_cli.errors import DataError
    from cgmq_cli.trainer import Trainer

    out = tmp_path / "run"
    assert _compress(digits_ckpt, out).exit_code == 0
    before = snapshot(out, skip=(out / rundir.LOCK,))
    real = Trainer.run

    def broken(self, save=None):  # noqa: ANN001 - fails before an epoch is trained (a user's loss or data, a bug)
        raise DataError("--data digits: a batch could not be read")

    monkeypatch.setattr(Trainer, "run", broken)
    one_line_error(_compress(digits_ckpt, out, "--force"), EXIT_BAD_INPUT, "could not be read")
    assert snapshot(out, skip=(out / rundir.LOCK,)) == before  # the finished run is back as it was

    def one_epoch_then_interrupted(self, save=None):  # noqa: ANN001
        self.state.epoch = 1
        save(self.state)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "run", one_epoch_then_interrupted)
    stopped = _compress(digits_ckpt, out, "--force")
    assert stopped.exit_code == EXIT_INTERRUPTED and str(out / rundir.HELD) in stopped.stderr
    assert (out / rundir.HELD / "report.json").is_file() and not (out / "report.json").exists()
    monkeypatch.setattr(Trainer, "run", real)
    assert cli("compress", "--resume", out).exit_code == 0
    assert (out / "report.json").is_file() and not (out / rundir.HELD).exists()  # finished: the old run is gone


def test_a_forced_sweep_that_runs_nothing_puts_the_replaced_sweep_back(digits_ckpt: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from cgmq_cli import compress
    from cgmq_cli.errors import DataError

    out = tmp_path / "sw"
    args = ["sweep", digits_ckpt, "--arch", ARCH, *FAST, "--budgets", "rel_bops=5", "--out", out]
    assert cli(*args).exit_code == 0
    before = snapshot(out, skip=(out / rundir.LOCK,))

    def broken(*_a, **_k):  # noqa: ANN002, ANN003
        raise DataError("--data digits: a batch could not be read")

    monkeypatch.setattr(compress, "compress", broken)
    one_line_error(cli(*args, "--force"), EXIT_BAD_INPUT, "could not be read")
    assert snapshot(out, skip=(out / rundir.LOCK,)) == before


def test_resume_refuses_a_model_file_that_changed_since_the_run_started(digits_ckpt: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from cgmq_cli.trainer import Trainer

    model = tmp_path / "m.pt"
    shutil.copy(digits_ckpt, model)
    real = Trainer.run

    def one_epoch_then_interrupted(self, save=None):  # noqa: ANN001
        self.state.epoch = 1
        save(self.state)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "run", one_epoch_then_interrupted)
    out = tmp_path / "run"
    assert _compress(str(model), out).exit_code == EXIT_INTERRUPTED
    monkeypatch.setattr(Trainer, "run", real)
    original = model.read_bytes()
    state = torch.load(model, weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, model)  # other weights
    before = snapshot(out, skip=(out / rundir.LOCK,))
    one_line_error(cli("compress", "--resume", out), EXIT_BAD_INPUT, f"was started from {model}", "changed since")
    assert snapshot(out, skip=(out / rundir.LOCK,)) == before
    model.write_bytes(original)
    assert cli("compress", "--resume", out).exit_code == 0
