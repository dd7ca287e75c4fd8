"""torchrun with 2 gloo processes on CPU: within budget, same widths as one process, kill-one-rank, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

ARCH = "cgmq_cli.models:DigitsCNN"
COMMON = ["--arch", ARCH, "--data", "digits", "--subset", "1024", "--batch-size", "64", "--budget-rel-bops", "1.5",
          "--epochs", "3", "--gate-steps", "100"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "cgmq_cli", "compress", *args]


def _single(*args: str) -> list[str]:
    return [sys.executable, "-m", "cgmq_cli", "compress", *args]


def _widths(report: dict) -> list[tuple[int, int]]:
    return [(l["bits_w"], l["bits_a"]) for l in report["layers"]]


def test_two_gloo_processes_match_one_process(digits_ckpt: str, tmp_path: Path) -> None:
    ddp = subprocess.run(_torchrun(2, digits_ckpt, *COMMON, "--out", str(tmp_path / "ddp"), "--json"),
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run(_single(digits_ckpt, *COMMON, "--out", str(tmp_path / "one"), "--json"),
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = json.loads(ddp.stdout), json.loads(one.stdout)  # only rank 0 printed: one JSON object
    assert a["feasible"] and b["feasible"]
    assert _widths(a) == _widths(b)  # same global batches, gate steps all-reduced: the same widths
    assert abs(a["accuracy"]["quantized"] - b["accuracy"]["quantized"]) <= 1.0  # tolerance: 1 point (4 of 360)
    assert "distributed: 2 processes, global batch 64" in (tmp_path / "ddp" / "train.log").read_text()
    assert not list((tmp_path).glob("ddp/*.tmp"))


def test_killing_one_rank_stops_the_job_and_the_checkpoint_resumes(digits_ckpt: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [a if a != "100" else "400" for a in COMMON]  # a longer gate epoch to kill it in
    proc = subprocess.Popen(_torchrun(2, digits_ckpt, *args, "--batch-size", "16", "--out", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 300
    while not ((out / "train.log").exists() and "epoch=1 epoch_start" in (out / "train.log").read_text()):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    time.sleep(1.0)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2, children
    os.kill(int(children[-1]), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "another process of this distributed run failed" in err or "SIGTERM" in err
    assert "cgmq compress --resume" in err or "Signal 9" in err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and not (out / "report.json").exists()
    resumed = subprocess.run(_single("--resume", str(out), "--json"), capture_output=True, text=True, env=ENV,
                             timeout=600)  # resumed by one process
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(resumed.stdout)
    assert report["feasible"] and report["epochs"] == 3
