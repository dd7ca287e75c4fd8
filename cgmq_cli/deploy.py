"""Export a finished run to ONNX (QDQ and, on request, float) with verification on by default.

    load_run -> export_qdq (checker, read-back BOPs == report, onnxruntime load, parity) -> [float] -> [latency]
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cgmq_cli import data
from cgmq_cli.compress import load_run
from cgmq_cli.errors import CgmqError, CheckFailedError, UsageError
from cgmq_cli.export import onnx_qdq, verify

PARITY_BATCHES = 32  # up to 32 validation batches (every example of small sets)


@dataclass(frozen=True)
class ExportResult:
    run_dir: Path
    qdq: onnx_qdq.ExportInfo
    float: onnx_qdq.ExportInfo | None = None
    latency_ms: dict = field(default_factory=dict)
    parity_source: str = ""
    report_bops: int = 0

    def as_dict(self) -> dict:
        out = {"run": str(self.run_dir), "onnx": self.qdq.as_dict(), "parity_source": self.parity_source,
               "report_bops": self.report_bops, "float": self.float.as_dict() if self.float else None}
        if self.latency_ms:
            out["latency_ms"] = self.latency_ms
        return out


def _refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise UsageError(f"{path} already exists", "pass --force to replace it, or choose another path")
    if path.exists() and path.is_dir():
        raise UsageError(f"{path} is a directory")


def _parity_inputs(settings, qm) -> tuple[list[torch.Tensor] | None, str]:
    """The run's validation inputs, or None (random inputs) when the data cannot be loaded now."""
    try:
        bundle = data.load_data(settings.data, None, settings.seed)
    except CgmqError as exc:
        return None, f"64 random inputs (validation data unavailable: {exc.message})"
    _, val = data.make_loaders(bundle, 64, 0, settings.seed)
    inputs = [x for x, _ in itertools.islice(val, PARITY_BATCHES)]
    return inputs, f"{sum(len(x) for x in inputs)} validation examples of {settings.data}"


def export_run(run_dir: Path, onnx_path: Path | None, opset: int = 25, float_path: Path | None = None,
               benchmark: bool = False, force: bool = False) -> ExportResult:
    onnx_path = onnx_path or run_dir / "model.onnx"
    _refuse_existing(onnx_path, force)
    if float_path is not None:
        _refuse_existing(float_path, force)
    run = load_run(run_dir)
    qm = run.qm
    qm.gm.cpu().eval()
    if qm.cost().bops != run.report["cost"]["bops"]:
        raise CheckFailedError(f"the rebuilt model costs {qm.cost().bops:,} BOPs but report.json says "
                               f"{run.report['cost']['bops']:,}", "the run directory was modified; compress again")
    inputs, source = _parity_inputs(run.settings, qm)
    metadata = {"budget": run.report["budget"], "run": run.report["run"], "profile": run.profile.name}
    info = onnx_qdq.export_qdq(qm, onnx_path, opset, metadata, parity_inputs=inputs)
    float_info = onnx_qdq.export_float(qm, float_path, opset) if float_path is not None else None
    latency = {}
    if benchmark:
        example = torch.zeros((1, *qm.sample_shape))
        latency["qdq"] = verify.latency(onnx_path, example)
        if float_info is not None:
            latency["float"] = verify.latency(float_path, example)
            latency["ratio_qdq_over_float"] = latency["qdq"] / latency["float"]
    return ExportResult(run_dir, info, float_info, latency, source, run.report["cost"]["bops"])
