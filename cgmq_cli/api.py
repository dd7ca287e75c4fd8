"""The pipeline as library functions returning frozen result objects.

    settings -> compress -> load_run / report -> export -> verify
                 sweep (one compress per budget, float evaluation and calibration shared)

The CLI only parses arguments, calls these functions and renders what comes
back; everything here raises :class:`cgmq_cli.errors.CgmqError` kinds for bad
input and never prints (progress goes to the ``on_event``/``notify``
callbacks). Heavy modules (torch, onnx, onnxruntime) are imported by the
functions that need them, so that importing this module is cheap::

    from cgmq_cli import api

    settings = api.settings("digits_cnn.pt", arch="cgmq_cli.models:DigitsCNN", data="digits",
                            budget_rel_bops=2, budget_weight_bytes=16384, out="runs/api")
    result = api.compress(settings)            # CompressResult: run_dir, report
    run = api.load_run(result.run_dir)         # Run: .model is a quantized nn.Module
    logits = run.model(torch.zeros(1, *run.sample_shape))
    exported = api.export(run.path)            # ExportResult: the verified QDQ ONNX file
    checked = api.verify(exported.qdq.path, budget_rel_bops=2)   # Verification: .ok, .failures
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from cgmq_cli.errors import CheckFailedError, UsageError

if TYPE_CHECKING:
    from torch import nn

    from cgmq_cli import checkpoint, qmodel
    from cgmq_cli.compress import CompressResult, CompressSettings
    from cgmq_cli.deploy import ExportResult
    from cgmq_cli.export.verify import VerifyResult
    from cgmq_cli.profiles import HardwareProfile
    from cgmq_cli.sweep import Shared, SweepResult
    from cgmq_cli.trainer import Event

DEFAULT_IMAGE_SHAPE = (3, 224, 224)


# ------------------------------------------------------------------------------ the model ---


@dataclass(frozen=True)
class ModelRequest:
    """What the user said about the model: MODEL, --arch, --trust-checkpoint, --leaf, --input-shape."""

    model: str
    arch: str | None = None
    trust: bool = False
    leaves: tuple[str, ...] = ()
    input_shape: tuple[int, ...] | None = None  # with batch dim, as typed
    input_dtype: str = "float32"  # float32, or int64 for token ids


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"1,3,224,224"`` -> (1, 3, 224, 224); positive integers, bounded size (see settings.parse_shape)."""
    from cgmq_cli.settings import parse_shape

    return parse_shape(text, "--input-shape")


def sample_shape_for(request: ModelRequest, source: "checkpoint.ModelSource", data: str | None = None) -> tuple[int, ...]:
    """One example's shape: --input-shape (minus batch), else what the file, the name or ``data`` implies."""
    from cgmq_cli import checkpoint

    if request.input_shape is not None:
        return tuple(request.input_shape[1:])
    if source.sample_shape:
        return tuple(source.sample_shape)
    if data is not None:
        from cgmq_cli import data as data_mod

        return tuple(data_mod.load_data(data, 1).sample_shape)
    if source.kind == "torchvision" or (source.arch or "").startswith(checkpoint.TORCHVISION):
        return (3, 299, 299) if "inception" in (source.arch or source.model) else DEFAULT_IMAGE_SHAPE
    raise UsageError("the model's input shape is unknown", "pass --input-shape, e.g. --input-shape 1,3,224,224, or --data")


def load(request: ModelRequest) -> "tuple[nn.Module, checkpoint.ModelSource]":
    """The model as the user gave it (eval mode) and where it came from."""
    from cgmq_cli import checkpoint

    return checkpoint.load_model(request.model, request.arch, request.trust)


def prepare(model: "nn.Module", sample_shape: Sequence[int], leaves: Sequence[str], profile: "HardwareProfile",
            dtype: str = "float32") -> "qmodel.QuantizedModel":
    """Insert quantizers with the widths, signedness and granularity the profile allows.

    ``dtype`` is the input's: ``float32``, or ``int64`` for token ids (a model that starts with an embedding).
    """
    import torch

    from cgmq_cli import qmodel

    return qmodel.prepare(
        model, sample_shape, leaves, input_dtype=getattr(torch, dtype),
        widths_for=profile.widths_for,
        input_bits=profile.input_bits,
        signedness=profile.act_signedness,
        per_channel=profile.weight_granularity == "per-channel",
        integer_ops=profile.integer_ops,
        reduce_range=profile.reduce_range,
        integer_width=profile.integer_width or 8,
    )


@dataclass(frozen=True)
class InspectResult:
    model: str
    sample_shape: tuple[int, ...]
    layers: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    float_ops: list[dict] = field(default_factory=list)  # compute left in float, with the reason
    notes: tuple[str, ...] = ()  # things the user should know (fixed batch size, BatchNorm left unfolded)

    def as_dict(self) -> dict:
        return {"layers": self.layers, "totals": self.totals, "float_ops": self.float_ops, "notes": list(self.notes)}


def inspect(request: ModelRequest, profile_spec: str | None = None, data: str | None = None) -> InspectResult:
    """The quantizable layers of a model with their MACs and parameters.

    The example input's shape comes from ``request.input_shape``, the model
    file, ``data`` (a data spec such as ``digits``) or the torchvision name.
    """
    from cgmq_cli import checkpoint
    from cgmq_cli.graph import passes
    from cgmq_cli.profiles import load_profile
    from cgmq_cli.settings import check_elements

    profile = load_profile(profile_spec)
    model, source = load(request)
    notes = []
    if source.fixed_batch is not None:
        if source.fixed_batch != 1:
            raise checkpoint.fixed_batch_error(request.model, source.fixed_batch)
        error = checkpoint.fixed_batch_error(request.model, source.fixed_batch)
        notes.append(f"{error.message}: inspect works, but compress will refuse it; {error.hint}")
    shape = sample_shape_for(request, source, data)
    check_elements(tuple(shape), "the example input")
    dtype = source.sample_dtype if request.input_dtype == "float32" else request.input_dtype
    qm = prepare(model, shape, request.leaves, profile, dtype)
    unfolded = passes.batchnorms(qm.gm)
    if unfolded:
        notes.append(f"{len(unfolded)} BatchNorm(s) stay unfolded (float, not quantized): "
                     f"{', '.join(unfolded[:5])}{' ...' if len(unfolded) > 5 else ''}; only a BatchNorm directly "
                     "after a conv whose output feeds nothing else is folded")
    summary = qm.cost()
    layers = [{"name": s.name, "op": s.op, "macs": s.macs, "params": s.params} for s in qm.shapes]
    totals = {"macs": summary.macs, "quantized_macs": summary.quantized_macs, "coverage": summary.coverage,
              "params": summary.params, "float_params": summary.float_params, "bops_fp32": summary.bops_fp32}
    return InspectResult(model=request.model, sample_shape=shape, layers=layers, totals=totals,
                         float_ops=[op.as_dict() for op in qm.float_ops], notes=tuple(notes))


# ------------------------------------------------------------------------------ compress ---


BUDGET_ARGS = {"budget_bops": "bops", "budget_rel_bops": "rel_bops", "budget_weight_bytes": "weight_bytes",
               "budget_cost": "cost"}


def settings(model: str | None = None, *, data: str | None = None, budget_bops: float | None = None,
             budget_rel_bops: float | None = None, budget_weight_bytes: float | None = None,
             budget_cost: float | None = None, project_file: bool = False, **options: Any) -> "CompressSettings":
    """Validated compress settings, named like the ``cgmq compress`` flags.

    ``options`` are the other flags with underscores: ``arch``, ``input_shape``
    (``"1,1,8,8"``), ``leaf``, ``trust``, ``subset``, ``batch_size``,
    ``workers``, ``augment``, ``profile``, ``weight_bits`` (``"4,8"``), ``act_bits``,
    ``epochs``, ``lr``, ``seed``, ``device``, ``loss``, ``out``,
    ``gate_steps``, ``finish``, ``amp``. Every value passes the same checks as
    a flag. ``project_file=True`` also reads ``cgmq.yaml`` / ``[tool.cgmq]`` of
    the working directory (flags win), as the CLI does; by default only the
    arguments and the profile's default budgets count.
    """
    from cgmq_cli import settings as settings_mod

    known = ("arch", "input_shape", "leaf", "trust", "data", "subset", "batch_size", "workers", "augment", "profile",
             "weight_bits", "act_bits", "epochs", "lr", "seed", "device", "loss", "out", "gate_steps", "finish", "amp")
    for key in options:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, known, n=1)
            raise UsageError(f"unknown compress setting {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
                             f"known settings: {', '.join(known)}")
    flags = {"model": model, "data": data, **options}
    if flags.get("trust") is False:
        flags["trust"] = None
    if flags.get("amp") is False:
        flags["amp"] = None
    budgets = {key: value for arg, key in BUDGET_ARGS.items()
               if (value := {"budget_bops": budget_bops, "budget_rel_bops": budget_rel_bops,
                             "budget_weight_bytes": budget_weight_bytes, "budget_cost": budget_cost}[arg]) is not None}
    return settings_mod.resolve_compress(flags, budgets, project_file=project_file)


def compress(settings: "CompressSettings", on_event: "Callable[[Event], None] | None" = None, force: bool = False,
             shared: "Shared | None" = None) -> "CompressResult":
    """Compress within the settings' budget(s) into ``settings.out``; returns the run directory and its report.

    Every setting, the model, the data and the budget are checked before the
    run directory is created (``force`` replaces an earlier cgmq run there).
    ``on_event`` receives the training events (epoch starts, progress, epoch
    ends). ``shared`` is a :func:`shared_start` of the same model and data: the
    float evaluation and the calibration are then taken from it (a sweep).
    """
    from cgmq_cli import compress as compress_mod

    if shared is not None:
        from cgmq_cli.sweep import shared_inputs

        if shared.inputs != shared_inputs(settings):
            raise UsageError("the shared float evaluation and calibration were made for other settings",
                             "make them with api.shared_start(settings) of the same model, data and widths")
    return compress_mod.compress(settings, on_event, force=force, shared=shared)


def resume(run_dir: str | Path, on_event: "Callable[[Event], None] | None" = None, trust: bool = False,
           notify: Callable[[str], None] | None = None) -> "CompressResult":
    """Continue an interrupted run from its last checkpoint, with its saved settings."""
    from cgmq_cli import compress as compress_mod

    return compress_mod.resume(Path(run_dir), on_event, trust=trust, notify=notify)


def shared_start(settings: "CompressSettings") -> "Shared":
    """Float accuracy and calibrated quantizer steps of ``settings``' model and data, for several compress calls.

    Valid for settings that differ from ``settings`` only in the budget and the output directory.
    """
    from cgmq_cli import sweep as sweep_mod

    return sweep_mod.shared_start(settings)


# ---------------------------------------------------------------------------------- runs ---


def resolve(run: str | Path | None) -> Path:
    """A run (or sweep) directory given by the user, or the one ``runs/latest`` points to."""
    from cgmq_cli import rundir

    return rundir.resolve_run(None if run is None else str(run))


def load_report(run: str | Path | None) -> dict:
    """report.json of a finished run, with its fields checked (no torch needed)."""
    from cgmq_cli import run_files

    return run_files.read_report(resolve(run))


@dataclass(frozen=True)
class Run:
    """A finished run, rebuilt: its quantized model, widths and report.

    ``model`` computes what the exported ONNX file computes: the traced model
    with BatchNorm folded and every weight and activation on the integer grid
    of its width (fake quantization in float), in eval mode on the CPU.
    """

    path: Path
    model: "nn.Module"
    report: Mapping[str, Any]
    widths: Mapping[str, int]  # quantizer key -> width (32 = float)
    labels: Mapping[str, str]  # quantizer key -> what it quantizes, e.g. "weight of features.0"
    bits: Mapping[str, tuple[int, int]]  # layer -> (weight bits, input bits)
    sample_shape: tuple[int, ...]
    settings: "CompressSettings"
    profile: "HardwareProfile"
    quantized: "qmodel.QuantizedModel"


def load_run(run: str | Path | None, trust: bool = False, notify: Callable[[str], None] | None = None) -> Run:
    """Rebuild a finished run's quantized model (architecture from its recipe, state and widths from model.pt).

    ``trust`` is needed for a run made from a pickled module, or one that was
    moved or belongs to someone else and names code to import.
    """
    from cgmq_cli import saved_run

    loaded = saved_run.load_run(resolve(run), trust, notify)
    qm = loaded.qm
    qm.gm.cpu().eval()
    qm.set_probing(False)
    return Run(path=loaded.run_dir, model=qm.gm, report=MappingProxyType(loaded.report),
               widths=MappingProxyType(qm.widths()), labels=MappingProxyType({k: t.label for k, t in qm.tensors.items()}),
               bits=MappingProxyType(qm.bits()), sample_shape=tuple(qm.sample_shape), settings=loaded.settings,
               profile=loaded.profile, quantized=qm)


# ----------------------------------------------------------------------- export, verify ---


def export(run: str | Path | None, onnx: str | Path | None = None, opset: int | None = None, float_path: str | Path | None = None,
           benchmark: bool = False, force: bool = False, trust: bool = False,
           notify: Callable[[str], None] | None = None, **options: Any) -> "ExportResult":
    """Export a finished run to QDQ ONNX (default ``RUN/model.onnx``), verified before the file is written.

    The file must pass onnx.checker, its widths read back must give the
    report's BOPs, it must load in onnxruntime and agree with ``load_run(run).model``
    on the run's validation data. ``float_path`` also writes the float model
    as the user gave it (unquantized, BatchNorm unfolded); ``benchmark``
    measures onnxruntime latency.
    """
    from cgmq_cli.deploy import export_run

    return export_run(resolve(run), None if onnx is None else Path(onnx), opset,
                      None if float_path is None else Path(float_path), benchmark, force, trust, notify, **options)


@dataclass(frozen=True)
class Verification:
    """What :func:`verify` read back from an ONNX file, and the budgets it was checked against."""

    file: Path
    widths: "VerifyResult"
    budget: Mapping[str, float | None]  # {"bops": limit, "weight_bytes": limit}
    failure: str | None = None  # "over budget: ..." when a budget does not hold
    hint: str | None = None
    openvino: "Any" = None  # with runtime="openvino": per layer whether OpenVINO runs it in int8, and parity


    @property
    def ok(self) -> bool:
        return self.failure is None

    def as_dict(self) -> dict:
        return {"file": str(self.file), **self.widths.as_dict(), "budget": dict(self.budget), "ok": self.ok,
                "failures": [self.failure] if self.failure else [],
                **({"openvino": self.openvino.as_dict()} if self.openvino is not None else {})}


def verify(onnx_file: str | Path, budget_bops: float | None = None, budget_rel_bops: float | None = None,
           budget_weight_bytes: float | None = None, runtime: str = "onnxruntime", **options: Any) -> Verification:
    """Read every layer's widths back from a QDQ ONNX file (any tool's) and check it against the budgets.

    ``budget_rel_bops`` is percent of the file's own 32x32 BOPs. Over budget
    is not an exception here: see ``.ok`` and ``.failure`` (the CLI exits 4).
    ``runtime="openvino"`` also loads the file in OpenVINO (extra ``cgmq[openvino]``)
    and compares its outputs with onnxruntime's.
    """
    from cgmq_cli.export import openvino as ov
    from cgmq_cli.export import verify as ver

    if runtime not in ("onnxruntime", "openvino"):
        raise UsageError(f"--runtime {runtime!r}: expected onnxruntime or openvino")
    if runtime == "openvino":
        ov.require()
    path = Path(onnx_file)
    if not path.is_file():
        raise UsageError(f"{path} not found" if not path.exists() else f"{path} is not a file")
    result = ver.read_widths(path, **options)
    if not result.loads:
        ver.load_session(path)  # raises: one line with onnxruntime's reason, exit 2
    bops = budget_bops
    if budget_rel_bops is not None:  # percent of the file's own 32x32 BOPs, as an absolute limit
        rel_limit = budget_rel_bops / 100 * result.macs * 32 * 32
        bops = rel_limit if bops is None else min(bops, rel_limit)
    failure = hint = None
    try:
        ver.check_budget(result, bops, budget_weight_bytes)
    except CheckFailedError as exc:
        failure, hint = exc.message, exc.hint
    second = ov.compare(path, [row.node for row in result.layers]) if runtime == "openvino" else None
    return Verification(path, result, MappingProxyType({"bops": bops, "weight_bytes": budget_weight_bytes}),
                        failure, hint, second)


# ---------------------------------------------------------------------------------- sweep ---


def sweep(settings: "CompressSettings", key: str, values: Sequence[float], out: str | Path,
          on_event: "Callable[[Event], None] | None" = None, notify: Callable[[str], None] | None = None,
          force: bool = False) -> "SweepResult":
    """One compress per value of budget ``key`` (``rel_bops``, ``bops``, ``weight_bytes`` or ``cost``).

    The other budgets of ``settings`` hold for every point. The float
    evaluation and the calibration are computed once. ``out`` becomes a sweep
    directory: one run per point, ``sweep.json``/``.md``/``.csv`` and, with
    matplotlib, ``sweep.png`` (accuracy against cost with the Pareto front).
    """
    from cgmq_cli import sweep as sweep_mod

    return sweep_mod.run_sweep(settings, key, list(values), Path(out), on_event, notify, force)


def sweep_target(settings: "CompressSettings", key: str, low: float, high: float, max_drop: float, out: str | Path,
                 max_runs: int = 6, on_event: "Callable[[Event], None] | None" = None,
                 notify: Callable[[str], None] | None = None, force: bool = False) -> "SweepResult":
    """The smallest budget in [low, high] whose run loses at most ``max_drop`` accuracy points (bisection).

    At most ``max_runs`` compress runs, every one kept in the sweep directory;
    ``result.chosen`` is the smallest tested budget that met the drop (None
    when even ``high`` did not).
    """
    from cgmq_cli import sweep as sweep_mod

    return sweep_mod.run_target(settings, key, low, high, max_drop, Path(out), max_runs, on_event, notify, force)


def is_sweep(path: str | Path) -> bool:
    """Whether ``path`` is a sweep directory (it holds sweep.json)."""
    from cgmq_cli import sweep as sweep_mod

    return sweep_mod.is_sweep(Path(path))


def load_sweep(path: str | Path) -> dict:
    """sweep.json of a sweep directory, checked."""
    from cgmq_cli import sweep as sweep_mod

    return sweep_mod.read_sweep(Path(path))
