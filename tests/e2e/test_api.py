"""cgmq_cli.api: settings, compress, load_run (a quantized nn.Module), export and verify from Python."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import ARCH
from cgmq_cli import api
from cgmq_cli.errors import CgmqError, UsageError


def test_settings_are_checked_like_flags(digits_ckpt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="unknown compress setting 'epoch'; did you mean 'epochs'"):
        api.settings(digits_ckpt, data="digits", budget_rel_bops=2, epoch=3)
    with pytest.raises(UsageError, match="--epochs 0: must be an integer from 1"):
        api.settings(digits_ckpt, data="digits", budget_rel_bops=2, epochs=0)
    with pytest.raises(UsageError, match="no budget|budget"):
        api.settings(digits_ckpt, data="digits", budget_rel_bops=-1)
    (tmp_path / "cgmq.yaml").write_text("epochs: 3\nbudgets: {rel_bops: 5}\n")
    monkeypatch.chdir(tmp_path)
    plain = api.settings(digits_ckpt, arch=ARCH, data="digits", budget_rel_bops=2, out="runs/x")
    assert plain.train.epochs == 6 and plain.budget.rel_bops == 2  # the project file is not read by default
    project = api.settings(digits_ckpt, arch=ARCH, data="digits", out="runs/x", project_file=True)
    assert project.train.epochs == 3 and project.budget.rel_bops == 5


def test_compress_from_python(digits_ckpt: str, tmp_path: Path) -> None:
    events = []
    settings = api.settings(digits_ckpt, arch=ARCH, data="digits", budget_rel_bops=3, out=str(tmp_path / "run"),
                            epochs=1, subset=256, gate_steps=5, weight_bits="2,4,16,32", act_bits="4,16,32")
    result = api.compress(settings, on_event=events.append)
    assert result.run_dir == tmp_path / "run" and result.report["feasible"]
    assert result.report["cost"]["rel_bops"] <= 3
    assert [e.kind for e in events if e.kind in ("epoch_start", "epoch_end")] == ["epoch_start", "epoch_end"]
    assert api.load_report(result.run_dir) == result.report


def test_compress_with_augmentation_trains_on_flipped_images_and_says_so(digits_ckpt: str, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from cgmq_cli import augment

    epochs = []
    real = augment.Augmented.set_epoch
    monkeypatch.setattr(augment.Augmented, "set_epoch", lambda self, e: (epochs.append(e), real(self, e))[1])
    settings = api.settings(digits_ckpt, arch=ARCH, data="digits", budget_rel_bops=3, out=str(tmp_path / "run"),
                            epochs=2, subset=256, gate_steps=5, augment="hflip")
    result = api.compress(settings)
    assert result.report["augment"] == "hflip" and result.report["feasible"] and epochs[-2:] == [0, 1]
    with pytest.raises(UsageError, match="--augment 'rotate'"):
        api.settings(digits_ckpt, arch=ARCH, data="digits", budget_rel_bops=3, augment="rotate")


def test_load_run_is_the_exported_model(run_copy: Path) -> None:
    import onnxruntime as ort

    run = api.load_run(run_copy)
    assert isinstance(run.model, torch.nn.Module) and not run.model.training
    assert run.path == run_copy and run.report["run"] == "base" and run.sample_shape == (1, 8, 8)
    assert {name: list(bits) for name, bits in run.bits.items()} == \
        {l["name"]: [l["bits_w"], l["bits_a"]] for l in run.report["layers"]}
    assert set(run.widths) == set(run.labels) and all(isinstance(w, int) for w in run.widths.values())
    with pytest.raises(TypeError):
        run.widths["x"] = 8  # read-only views
    exported = api.export(run_copy)
    assert exported.qdq.path == run_copy / "model.onnx"
    x = torch.rand(16, *run.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = run.model(x).numpy()
    session = ort.InferenceSession(str(exported.qdq.path), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(ours - theirs).max() < 1e-3
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    checked = api.verify(exported.qdq.path, budget_rel_bops=run.report["budget"]["rel_bops"])
    assert checked.ok and checked.widths.bops == run.report["cost"]["bops"]
    over = api.verify(exported.qdq.path, budget_bops=1)
    assert not over.ok and over.failure.startswith("over budget: BOPs") and over.as_dict()["failures"] == [over.failure]


def test_errors_are_cgmq_errors(tmp_path: Path) -> None:
    with pytest.raises(CgmqError, match="is not a cgmq run directory"):
        api.load_run(tmp_path / "nope")
    with pytest.raises(CgmqError, match="not found"):
        api.verify(tmp_path / "nope.onnx")


def test_importing_the_api_is_cheap() -> None:
    import subprocess
    import sys

    code = "import sys, cgmq_cli.api; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])}, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
