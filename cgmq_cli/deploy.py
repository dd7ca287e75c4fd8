"""Export a finished run to ONNX (QDQ and, on request, float) with verification on by default.

    load_run -> export_qdq (checker, read-back BOPs == report, onnxruntime load, parity) -> [float] -> [latency]
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from cgmq_cli import atomic, data, run_files, rundir
from cgmq_cli.saved_run import load_run
from cgmq_cli.errors import (CgmqError, CheckFailedError, ExportError, InterruptedRun, OutputError, UsageError,
                             is_interrupt, os_error)
from cgmq_cli.export import onnx_qdq, opsets, verify

PARITY_BATCHES = 32  # up to 32 validation batches (every example of small sets)
DEFAULT_OPSET = 25


@dataclass(frozen=True)
class ExportOptions:
    portable: bool = False
    allow_float_fallback: bool = False


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


def _is_cgmq_onnx(path: Path) -> bool:
    """Whether ``path`` is an ONNX file that cgmq exported (producer ``cgmq``): the only kind --force replaces."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False).producer_name == "cgmq"
    except Exception:  # noqa: BLE001 - not ONNX at all
        return False


def _check_target(path: Path, flag: str, force: bool) -> None:
    """Refuse, before any work, an output path export must not write (see the README's --force rules)."""
    if len(os.fsencode(path.name)) > 255:
        raise os_error(OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG)), path)
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"cannot write {flag} {path}: {probe} is a file, not a directory", "choose another path")
    folder = probe
    in_run = rundir.read_marker(path.parent) is not None or (path.parent / "config.json").is_file()
    if in_run and (path.name in rundir.RUN_FILES or path.suffix != ".onnx"):
        raise UsageError(f"{flag} {path} is a file of the run directory {path.parent}; export writes only .onnx files there",
                         "choose a path ending in .onnx, or outside the run directory")
    if path.is_symlink():
        raise UsageError(f"{flag} {path} is a symbolic link; cgmq does not replace links", "choose another path")
    if path.exists():
        if path.is_dir():
            raise UsageError(f"{flag} {path} is a directory", "name a file, e.g. model.onnx")
        if not path.is_file():  # reading a FIFO to see whether cgmq made it would wait forever
            raise UsageError(f"{flag} {path} is not a regular file (a pipe, socket or device)", "name a file, e.g. model.onnx")
        if not force:
            raise UsageError(f"{path} already exists", "pass --force to replace it, or choose another path")
        if not _is_cgmq_onnx(path):
            raise UsageError(f"{path} is not an ONNX file exported by cgmq; refusing to replace it even with --force",
                             "choose another path")
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        rundir.ensure_writable_dir(folder)


def _parity_inputs(settings, qm) -> tuple[list[torch.Tensor] | None, str]:
    """The run's validation inputs, or None (random inputs) when the data cannot be loaded now."""
    try:
        bundle = data.load_data(settings.data, None, settings.seed)
    except CgmqError as exc:
        return None, f"64 random inputs (validation data unavailable: {exc.message})"
    _, val = data.make_loaders(bundle, 64, 0, settings.seed)
    inputs = [x for x, _ in itertools.islice(val, PARITY_BATCHES)]
    return inputs, f"{sum(len(x) for x in inputs)} validation examples of {settings.data}"


def export_run(run_dir: Path, onnx_path: Path | None, opset: int | None = None, float_path: Path | None = None,
               benchmark: bool = False, force: bool = False, trust: bool = False,
               notify: Callable[[str], None] | None = None, *, portable: bool = False,
               allow_float_fallback: bool = False) -> ExportResult:
    """Export a finished run; every output path is checked before the model is rebuilt.

    ``opset`` defaults to 25, or 21 with ``portable``. On a profile with
    integer kernels, an op it promises that onnxruntime would run in float
    fails the export (exit 4) unless ``allow_float_fallback``; then each such
    op is one warning through ``notify``.
    ``float_path`` gets the float model as the user gave it (:func:`original_model`), for comparison.

    The run directory is locked while export writes into it; temporaries of a
    killed export are removed; Ctrl-C or SIGTERM leaves no partial file.
    """
    run_dir = Path(run_dir)
    onnx_path = Path(onnx_path) if onnx_path is not None else run_dir / "model.onnx"
    float_path = Path(float_path) if float_path is not None else None
    if float_path is not None and _same_file(onnx_path, float_path):
        raise UsageError(f"--onnx and --float name the same file {onnx_path}", "give the float model its own path")
    _check_target(onnx_path, "--onnx", force)
    if float_path is not None:
        _check_target(float_path, "--float", force)
    targets = [p for p in (onnx_path, float_path) if p is not None]
    writes_run = any(_inside(p, run_dir) for p in targets)
    try:
        lock = rundir.open_run(run_dir)
    except OutputError as exc:
        if writes_run:
            raise
        lock = None  # a read-only run directory: nothing can change it under us, and we write elsewhere
        if notify is not None:
            notify(f"note: {exc.message}; exporting without a lock")
    try:
        for target in targets:
            atomic.clean_stale(target.parent)
        if opset is None:
            opset = onnx_qdq.PORTABLE_OPSET if portable else DEFAULT_OPSET
        options = ExportOptions(portable=portable, allow_float_fallback=allow_float_fallback)
        return _export(run_dir, onnx_path, opset, float_path, benchmark, trust, notify, options)
    except (KeyboardInterrupt, Exception) as exc:
        if not is_interrupt(exc):  # an interrupt can come out of a C extension as another error (an ImportError)
            raise
        raise InterruptedRun("export interrupted; no partial file was left behind") from None
    finally:
        if lock is not None:
            lock.release()


@contextlib.contextmanager
def _writing(path: Path):
    """An OSError while writing ``path`` (disk full, read-only, ...) is one line naming it (no partial file)."""
    try:
        yield
    except OSError as exc:
        raise os_error(exc, path) from None


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def original_model(run_dir: Path, settings, trust: bool = False) -> torch.nn.Module:
    """The model as the user gave it to the run: unquantized, BatchNorm unfolded, the original weights.

    Rebuilt from the run's recipe: the model file it was made from (which
    must be unchanged: same sha256) with its --arch, or the torchvision name
    with the run's seed (the same random initialisation the run started from).
    """
    from cgmq_cli import checkpoint

    source = run_files.read_config(run_dir)["source"]
    if source["kind"] == "torchvision":
        torch.manual_seed(settings.seed)
        model, _ = checkpoint.load_model(source["model"], None, False)
        return model.eval()
    path = Path(source["model"])
    if not checkpoint.source_unchanged(source):
        raise UsageError(f"--float exports the model the run was made from, {path}, which is missing or changed since",
                         "restore that file, or drop --float")
    model, _ = checkpoint.load_model(str(path), source["arch"], trust)
    return model.eval()


def export_original(model: torch.nn.Module, sample_shape: tuple[int, ...], path: Path, opset: int,
                    metadata: dict) -> onnx_qdq.ExportInfo:
    """The user's float model as ONNX (dynamic batch when it allows), checked and loaded in onnxruntime first."""
    import onnx

    proto, dynamic = onnx_qdq._torch_export(model, tuple(sample_shape), opset)
    if opsets.opset_of(proto) != opset:
        proto = opsets.convert_down(proto, opset)
    onnx_qdq._finalize(proto, opset, {"cgmq.kind": "float-original", "cgmq.opset": str(opset),
                                      **{f"cgmq.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises several kinds
        raise ExportError(f"the float model fails onnx.checker: {str(exc).strip().splitlines()[0][:300]}",
                          "drop --float") from None
    onnx_qdq._write(proto, Path(path), lambda tmp: verify.load_session(tmp))
    return onnx_qdq.ExportInfo(path=Path(path), opset=opset, size_bytes=os.path.getsize(path), layers=(),
                               dynamic_batch=dynamic, metadata={p.key: p.value for p in proto.metadata_props})


def _export(run_dir: Path, onnx_path: Path, opset: int, float_path: Path | None, benchmark: bool, trust: bool,
            notify: Callable[[str], None] | None, options: ExportOptions) -> ExportResult:
    run = load_run(run_dir, trust, notify)
    qm = run.qm
    qm.gm.cpu().eval()
    if qm.cost().bops != run.report["cost"]["bops"]:
        raise CheckFailedError(f"the rebuilt model costs {qm.cost().bops:,} BOPs but report.json says "
                               f"{run.report['cost']['bops']:,}", "the run directory was modified; compress again")
    original = original_model(run_dir, run.settings, trust) if float_path is not None else None  # before writing
    inputs, source = _parity_inputs(run.settings, qm)
    metadata = {"budget": run.report["budget"], "run": run.report["run"], "profile": run.profile.name}
    with _writing(onnx_path):
        info = onnx_qdq.export_qdq(qm, onnx_path, opset, metadata, parity_inputs=inputs, portable=options.portable,
                                   allow_float_fallback=options.allow_float_fallback)
    for finding in info.kernels:
        if not finding.integer and notify is not None:
            notify(f"warning: {finding.line()}")
    float_info = None
    if float_path is not None:
        with _writing(float_path):
            float_info = export_original(original, qm.sample_shape, float_path, opset, metadata)
    latency = {}
    if benchmark:
        example = torch.zeros((1, *qm.sample_shape), dtype=qm.sample_dtype)
        latency["qdq"] = verify.latency(onnx_path, example)
        if float_info is not None:
            latency["float"] = verify.latency(float_path, example)
            latency["ratio_qdq_over_float"] = latency["qdq"] / latency["float"]
    return ExportResult(run_dir, info, float_info, latency, source, run.report["cost"]["bops"])
