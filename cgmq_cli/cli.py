"""Typer app: arguments -> api -> rendering. The one error boundary.

Domain errors (:class:`CgmqError`) become ``error: <message>`` and an optional
``hint: ...`` on stderr with the kind's exit code; any other exception is an
internal error (exit 1). Set ``CGMQ_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, List, Optional

import typer
from torch import nn
from typer.core import TyperGroup

from cgmq_cli import __version__, api, checks, render, rundir, settings
from cgmq_cli import compress as compress_mod
from cgmq_cli.compress import CompressSettings
from cgmq_cli.compress import compress as run_compress
from cgmq_cli.cost import Budget
from cgmq_cli.sanitize import clean
from cgmq_cli.errors import (EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, CgmqError, CheckFailedError,
                             InterruptedRun, UsageError, os_error)
from cgmq_cli.trainer import TrainConfig


def debug_enabled() -> bool:
    return os.environ.get("CGMQ_DEBUG", "") not in ("", "0")


def _click_flow() -> tuple[type[BaseException], ...]:
    """Exceptions that are click's control flow (usage errors, --help, exits): they pass the boundary.

    Typer >= 0.22 vendors its own click (``typer._click``) and does not install the
    ``click`` package; older typer uses that package. Cover both.
    """
    flow: tuple[type[BaseException], ...] = (typer.Exit, typer.Abort)
    typer_exc = getattr(getattr(typer, "exceptions", None), "TyperException", None)
    if typer_exc is not None:
        flow += (typer_exc,)
    try:
        import click
    except ImportError:
        return flow
    return flow + (click.exceptions.Exit, click.ClickException, click.exceptions.Abort)


_CLICK_FLOW = _click_flow()


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """click's usage errors (bad or missing flags and values), in typer's vendored click and the package."""
    kinds: list[type[BaseException]] = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            module = __import__(name, fromlist=["UsageError"])
        except ImportError:
            continue
        kinds.append(module.UsageError)
    return tuple(kinds)


_USAGE_ERRORS = _usage_error_types()


_SIGNALLED = {"seen": False}  # a real SIGINT/SIGTERM reached this process (not a KeyboardInterrupt raised in code)


def _quiet_after_interrupt() -> None:
    """After the first Ctrl-C / SIGTERM is handled, further ones must not interrupt the shutdown (atexit hooks)."""
    if not _SIGNALLED["seen"]:
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            signal.signal(sig, signal.SIG_IGN)


class CgmqGroup(TyperGroup):
    """Runs every command inside the error boundary (also under CliRunner).

    CgmqError -> its one line and exit code; click usage errors -> one line, exit 2;
    OSError -> one line with the errno text, exit 2; sys.exit from user code -> exit 2
    (never one of cgmq's own codes); Ctrl-C -> exit 130; anything else is a bug (exit 1).
    """

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CgmqError as exc:
            if debug_enabled():
                raise
            if isinstance(exc, InterruptedRun):
                _quiet_after_interrupt()
            render.error(exc.message, exc.hint)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            _quiet_after_interrupt()
            render.error("interrupted")
            ctx.exit(EXIT_INTERRUPTED)
        except _USAGE_ERRORS as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":
                raise
            command = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "cgmq"
            render.error(exc.format_message(), f"see `{command} --help`")
            ctx.exit(EXIT_BAD_INPUT)
        except _CLICK_FLOW:  # --help, exits: click/typer handle them
            raise
        except SystemExit as exc:  # only user code (an arch, loss or data file) calls sys.exit inside a command
            if debug_enabled():
                raise
            render.error(f"code cgmq imported called sys.exit({exc.code!r})",
                         "an --arch, --loss or --data module must not exit")
            ctx.exit(EXIT_BAD_INPUT)
        except OSError as exc:
            if debug_enabled():
                raise
            error = os_error(exc, action="read or write")
            render.error(error.message, error.hint)
            ctx.exit(EXIT_BAD_INPUT)
        except Exception as exc:
            if debug_enabled():
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            render.error(f"internal error: {type(exc).__name__}: {first[:300]}",
                         "this is a bug in cgmq; rerun with CGMQ_DEBUG=1 for the traceback and report it")
            ctx.exit(EXIT_INTERNAL)


app = typer.Typer(
    cls=CgmqGroup,
    help="Compress PyTorch models to mixed precision under a hard hardware budget (CGMQ).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cgmq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Compress PyTorch models to mixed precision under a hard hardware budget (CGMQ)."""


# Options shared by every command that takes MODEL.
ArchOpt = typer.Option(None, "--arch", help="Architecture for a state_dict: package.module:Name, path/to/file.py:Name or torchvision:NAME.")
TrustOpt = typer.Option(False, "--trust-checkpoint", help="Trust the model file (a pickled nn.Module, a .pt2 with pickles) and, for a run directory, the code its config names; this command only. Runs code from the file: only for files you trust.")
LeafOpt = typer.Option(None, "--leaf", help="Keep this submodule untraced (repeatable), e.g. for data-dependent control flow.")
ShapeOpt = typer.Option(None, "--input-shape", help="Example input shape with batch first, e.g. 1,3,224,224.")
ProfileOpt = typer.Option(None, "--profile", help="Hardware profile: a preset name (see `cgmq profiles`) or a YAML file.")


def model_request(model: str, arch: Optional[str], trust: bool, leaf: Optional[List[str]], input_shape: Optional[str]) -> api.ModelRequest:
    return api.ModelRequest(model=model, arch=arch, trust=trust, leaves=settings.check_setting("leaf", leaf or [], "--leaf"),
                            input_shape=settings.parse_shape(input_shape, "--input-shape"))


@app.command()
def inspect(
    model: str = typer.Argument(..., help="Model file (.pt2, state_dict, trusted pickle) or torchvision:NAME."),
    arch: Optional[str] = ArchOpt,
    input_shape: Optional[str] = ShapeOpt,
    leaf: Optional[List[str]] = LeafOpt,
    trust_checkpoint: bool = TrustOpt,
    profile: Optional[str] = ProfileOpt,
    input_dtype: str = typer.Option("float32", "--input-dtype", help="Input element type: float32, or int64 for token ids."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout instead of a table."),
) -> None:
    """List the quantizable layers of a model with MACs, parameters, totals and the compute left in float."""
    if input_dtype not in ("float32", "int64"):
        raise UsageError(f"--input-dtype {input_dtype!r}: expected float32 or int64")
    request = replace(model_request(model, arch, trust_checkpoint, leaf, input_shape), input_dtype=input_dtype)
    result = api.inspect(request, profile)
    if as_json:
        render.json_out(result.as_dict())
    else:
        render.inspect_table(result)


@app.command()
def profiles(as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout.")) -> None:
    """List the hardware profiles shipped in presets/."""
    from cgmq_cli.profiles import list_presets

    rows = [{"name": p.name, "description": p.description, "weight_bits": list(p.weight_bits),
             "act_bits": list(p.act_bits), "input_bits": p.input_bits,
             "cost": "table" if p.cost_table else "bops"} for p in list_presets()]
    if as_json:
        render.json_out({"profiles": rows})
    else:
        render.profiles_table(rows)


@app.command()
def compress(
    model: Optional[str] = typer.Argument(None, help="Model file (.pt2, state_dict, trusted pickle) or torchvision:NAME; may come from cgmq.yaml."),
    arch: Optional[str] = ArchOpt,
    input_shape: Optional[str] = ShapeOpt,
    leaf: Optional[List[str]] = LeafOpt,
    trust_checkpoint: bool = TrustOpt,
    data_spec: Optional[str] = typer.Option(None, "--data", help="Training data: digits, mnist[:DIR], fashion-mnist[:DIR], cifar10[:DIR], imagefolder:DIR, module:fn or file.py:fn."),
    subset: Optional[int] = typer.Option(None, "--subset", help="Use only N training examples (a fixed seeded subset)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default 64)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader worker processes (default 0)."),
    profile: Optional[str] = ProfileOpt,
    weight_bits: Optional[str] = typer.Option(None, "--weight-bits", help="Narrow the profile's weight widths, e.g. 4,8."),
    act_bits: Optional[str] = typer.Option(None, "--act-bits", help="Narrow the profile's activation widths, e.g. 4,8."),
    budget_bops: Optional[str] = typer.Option(None, "--budget-bops", help="Budget in BOPs (sum of MACs x b_w x b_a), e.g. 1e8."),
    budget_rel_bops: Optional[str] = typer.Option(None, "--budget-rel-bops", help="Budget in percent of the float 32x32 BOPs, e.g. 1.5."),
    budget_weight_bytes: Optional[str] = typer.Option(None, "--budget-weight-bytes", help="Budget on the weight memory in bytes, e.g. 65536."),
    budget_cost: Optional[str] = typer.Option(None, "--budget-cost", help="Budget in the profile's cost-table unit (e.g. cycles)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Total epochs, split between gate and weight epochs (default 6)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate of weights and steps (Adam, default 1e-3)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed: the same seed repeats a run on the same machine."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu (default) or cuda."),
    loss: Optional[str] = typer.Option(None, "--loss", help="Loss as module:fn (default cross-entropy)."),
    out: Optional[str] = typer.Option(None, "--out", help="Run directory (default runs/<model>-<time>)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run directory."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue an interrupted run from its last checkpoint (--trust-checkpoint may be added)."),
    gate_steps: Optional[int] = typer.Option(None, "--gate-steps", help="Minimum batches per gate epoch (default 300; 0: one pass over the data)."),
    finish: Optional[str] = typer.Option(None, "--finish", help="Gate-epoch finish: repair-fill (default) or constraint (plain CGGD)."),
    amp: bool = typer.Option(False, "--amp", help="CUDA mixed precision (float16 autocast) for the model; quantizers stay float32."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json to stdout; logs go to stderr."),
) -> None:
    """Compress MODEL to mixed precision within the budget(s), learning every width by CGMQ."""
    flags = dict(model=model, arch=arch, input_shape=input_shape, leaf=leaf, trust=trust_checkpoint or None,
                 data=data_spec, subset=subset, batch_size=batch_size, workers=workers, profile=profile,
                 weight_bits=weight_bits, act_bits=act_bits, epochs=epochs, lr=lr, seed=seed, device=device,
                 loss=loss, out=out, gate_steps=gate_steps, finish=finish, amp=amp or None)
    budget_flags = {"bops": budget_bops, "rel_bops": budget_rel_bops, "weight_bytes": budget_weight_bytes,
                    "cost": budget_cost}
    if resume:
        given = [k for k, v in {**flags, **{f"budget_{k}": v for k, v in budget_flags.items()}}.items()
                 if v is not None and v != [] and k != "trust"]
        if force:
            given.append("force")
        if given:
            names = {"model": "MODEL", "data": "--data"}
            flag = names.get(given[0], "--" + given[0].replace("_", "-"))
            raise UsageError(f"--resume continues a run with its saved settings; it cannot be combined with {flag}",
                             "drop the other flags, or start a new run")
        run_dir = rundir.resolve_run(resume)
        with _terminate_as_interrupt(), render.TrainProgress() as progress:
            result = compress_mod.resume(run_dir, progress, trust=trust_checkpoint, notify=render.info)
    else:
        request = settings.resolve_compress(flags, budget_flags)
        with _terminate_as_interrupt(), render.TrainProgress() as progress:
            result = run_compress(request, progress, force=force)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    if as_json:
        render.json_out(result.report)
    else:
        render.compress_summary(result.report, result.run_dir)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (CI cancel, kill) behaves like Ctrl-C: stop at once, keep the last checkpoint.

    Only the first signal interrupts; later ones (a double Ctrl-C) are ignored while
    cgmq cleans up and exits, so no traceback comes out of a cleanup or atexit hook.
    """
    interrupted = False

    def handler(signum, frame):  # noqa: ANN001
        nonlocal interrupted
        if interrupted:
            return
        interrupted = _SIGNALLED["seen"] = True
        raise KeyboardInterrupt

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. some test runners)
            pass
    try:
        yield
    finally:
        if interrupted:
            _quiet_after_interrupt()
        else:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _load_reports(runs: Optional[List[str]]) -> list[tuple[Path, dict]]:
    dirs = [rundir.resolve_run(r) for r in runs] if runs else [rundir.resolve_run(None)]
    return [(d, rundir.read_report(d)) for d in dirs]


@app.command()
def report(
    runs: Optional[List[str]] = typer.Argument(None, help="Run directories (default runs/latest); two or more are compared side by side."),
    fmt: str = typer.Option("table", "--format", help="table (default), json, markdown or csv."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write a PNG: bits per layer and each layer's share of BOPs."),
) -> None:
    """Show a run's per-layer widths, cost against each budget and accuracy."""
    from cgmq_cli import report as rep

    if fmt not in ("table", "json", "markdown", "csv"):
        raise UsageError(f"--format {fmt!r}: expected table, json, markdown or csv")
    loaded = _load_reports(runs)
    reports = [r for _, r in loaded]
    if plot is not None:
        rep.plot(reports, plot)
        render.info(f"wrote {plot}")
    if fmt == "json":
        render.json_out(reports[0] if len(reports) == 1 else {"runs": reports})
    elif fmt == "csv":
        if len(reports) > 1:
            raise UsageError("--format csv shows one run; pass a single run directory")
        sys.stdout.write(rep.csv_text(reports[0]))
    elif fmt == "markdown":
        sys.stdout.write(rep.markdown(reports[0]) if len(reports) == 1 else rep.comparison_markdown(reports))
    else:
        render.stdout().print(rep.rich_report(reports[0]) if len(reports) == 1 else rep.comparison_table(reports))


@app.command()
def check(
    run: Optional[str] = typer.Argument(None, help="Run directory (default runs/latest)."),
    max_bops: Optional[str] = typer.Option(None, "--max-bops", help="Fail when the run's BOPs exceed N."),
    max_rel_bops: Optional[str] = typer.Option(None, "--max-rel-bops", help="Fail when relative BOPs exceed P percent."),
    max_weight_bytes: Optional[str] = typer.Option(None, "--max-weight-bytes", help="Fail when weight memory exceeds N bytes."),
    min_accuracy: Optional[float] = typer.Option(None, "--min-accuracy", help="Fail when quantized accuracy (percent) is below A."),
    max_accuracy_drop: Optional[float] = typer.Option(None, "--max-accuracy-drop", help="Fail when float minus quantized accuracy exceeds D points."),
    min_coverage: Optional[float] = typer.Option(None, "--min-coverage", help="Fail when less than P percent of the model's MACs run in quantized layers."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout."),
) -> None:
    """CI gate: exit 0 only when the run is within its budgets and every given threshold holds."""
    limits = dict(max_bops=settings.parse_number(max_bops, "--max-bops"),
                  max_rel_bops=settings.parse_number(max_rel_bops, "--max-rel-bops"),
                  max_weight_bytes=settings.parse_number(max_weight_bytes, "--max-weight-bytes"),
                  min_accuracy=settings.parse_threshold(min_accuracy, "--min-accuracy", fraction_hint=True),
                  max_accuracy_drop=settings.parse_threshold(max_accuracy_drop, "--max-accuracy-drop"),
                  min_coverage=settings.parse_threshold(min_coverage, "--min-coverage"))
    (run_dir, rep_dict), = _load_reports([run] if run else None)
    results = checks.run_checks(rep_dict, **limits)
    failed = [r for r in results if not r.ok]
    if as_json:
        render.json_out({"run": str(run_dir), "ok": not failed, "checks": [r.as_dict() for r in results]})
    else:
        for r in results:
            typer.echo(clean(r.line()))
    if failed:
        raise CheckFailedError(f"{len(failed)} of {len(results)} checks failed for {run_dir}")


@app.command()
def export(
    run: Optional[str] = typer.Argument(None, help="Run directory (default runs/latest)."),
    onnx_path: Optional[Path] = typer.Option(None, "--onnx", help="QDQ ONNX file to write (default RUN_DIR/model.onnx)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset: 25 (default) native int2/int4; 21-24 2-bit in int4; 13-20 8-bit containers with Clip."),
    portable: bool = typer.Option(False, "--portable", help="Containers every tested runtime loads (OpenVINO too): opset 21, 2-bit in int4, sub-8-bit inputs of 8-bit-weight layers in uint8 with Clip."),
    allow_float_fallback: bool = typer.Option(False, "--allow-float-fallback", help="Write the file even when an op the profile runs as an integer kernel would run in float in onnxruntime (a warning instead of exit 4)."),
    float_path: Optional[Path] = typer.Option(None, "--float", help="Also write the float model here, for comparison."),
    benchmark: bool = typer.Option(False, "--benchmark", help="Measure onnxruntime latency (median of repeated runs) of the files."),
    force: bool = typer.Option(False, "--force", help="Replace existing ONNX files that cgmq exported (never other files)."),
    trust_checkpoint: bool = TrustOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout."),
) -> None:
    """Export a run to ONNX QuantizeLinear/DequantizeLinear with its true widths, verified in onnxruntime."""
    from cgmq_cli.deploy import export_run

    if opset is not None and not 13 <= opset <= 25:
        raise UsageError(f"--opset {opset}: supported opsets are 13 to 25")
    if portable and opset is not None and opset > 21:
        raise UsageError(f"--portable writes opset 21 or older, not --opset {opset}", "drop --opset, or use 21 or lower")
    run_dir = rundir.resolve_run(run)
    with _terminate_as_interrupt():
        result = export_run(run_dir, onnx_path, opset, float_path, benchmark, force, trust_checkpoint, render.info,
                            portable=portable, allow_float_fallback=allow_float_fallback)
    if as_json:
        render.json_out(result.as_dict())
    else:
        render.export_summary(result)


@app.command()
def verify(
    onnx_file: Path = typer.Argument(..., help="A QDQ ONNX file (cgmq's or any other tool's)."),
    budget_bops: Optional[str] = typer.Option(None, "--budget-bops", help="Fail (exit 4) when the file's BOPs exceed N."),
    budget_rel_bops: Optional[str] = typer.Option(None, "--budget-rel-bops", help="Fail (exit 4) when BOPs exceed P percent of the file's 32x32 BOPs."),
    budget_weight_bytes: Optional[str] = typer.Option(None, "--budget-weight-bytes", help="Fail (exit 4) when the weight bytes exceed N."),
    runtime: str = typer.Option("onnxruntime", "--runtime", help="Also run the file in: onnxruntime (default) or openvino (which layers run in int8 there; outputs compared with onnxruntime)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout."),
) -> None:
    """Read every layer's widths back from an ONNX file's Q/DQ nodes; compute BOPs and weight bytes."""
    from cgmq_cli.export import openvino
    from cgmq_cli.export import verify as ver

    if runtime not in ("onnxruntime", "openvino"):
        raise UsageError(f"--runtime {runtime!r}: expected onnxruntime or openvino")
    if runtime == "openvino":
        openvino.require()
    if not onnx_file.is_file():
        raise UsageError(f"{onnx_file} not found" if not onnx_file.exists() else f"{onnx_file} is not a file")
    bops = settings.parse_number(budget_bops, "--budget-bops")
    rel = settings.parse_number(budget_rel_bops, "--budget-rel-bops")
    wbytes = settings.parse_number(budget_weight_bytes, "--budget-weight-bytes")
    result = ver.read_widths(onnx_file)
    if not result.loads:
        ver.load_session(onnx_file)  # raises: one line with onnxruntime's reason, exit 2
    if rel is not None:  # percent of the file's own 32x32 BOPs, as an absolute limit
        rel_limit = rel / 100 * result.macs * 32 * 32
        bops = rel_limit if bops is None else min(bops, rel_limit)
    second = openvino.compare(onnx_file, [row.node for row in result.layers]) if runtime == "openvino" else None
    if as_json:
        render.json_out({"file": str(onnx_file), **result.as_dict(), "budget": {"bops": bops, "weight_bytes": wbytes},
                         **({"openvino": second.as_dict()} if second is not None else {})})
    else:
        render.verify_table(onnx_file, result, bops, wbytes, second)
    ver.check_budget(result, bops, wbytes)


@app.command()
def demo(
    out: str = typer.Option("runs/demo", "--out", help="Run directory of the demo's compression."),
    budget_rel_bops: float = typer.Option(2.0, "--budget-rel-bops", help="Budget in percent of float BOPs."),
    epochs: int = typer.Option(6, "--epochs", help="CGMQ epochs (1 to 10000)."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier demo run (and its OUT-float/ model)."),
) -> None:
    """Offline walk-through: train a small CNN on digits, compress it within a budget, report, export ONNX."""
    from cgmq_cli import data, models, report as rep
    from cgmq_cli.trainer import evaluate, train_float

    epochs = settings.check_setting("epochs", epochs, "--epochs")
    budget = settings.check_float(budget_rel_bops, "--budget-rel-bops", 0.0, 100.0)
    out_dir = Path(out)
    float_dir = out_dir.parent / f"{out_dir.name}-float"
    float_path = float_dir / "digits_cnn.pt"
    rundir.check_new_run(out_dir, force)  # both outputs are checked before anything is written
    rundir.check_demo_dir(float_dir, force)
    render.info(f"1/4 training a float DigitsCNN on scikit-learn's digits (offline) -> {float_path}")
    bundle = data.load_data("digits")
    train_loader, val_loader = data.make_loaders(bundle, 32, 0, 0)
    model = train_float(models.DigitsCNN(), train_loader, epochs=15, lr=3e-3, seed=0)
    acc = evaluate(model, val_loader, nn.functional.cross_entropy, "cpu")["accuracy"]
    render.info(f"    float validation accuracy {acc:.2f}%")
    rundir.write_demo_model(float_dir, float_path.name, model.state_dict())
    render.info(f"2/4 cgmq compress {float_path} --arch cgmq_cli.models:DigitsCNN --data digits "
                f"--budget-rel-bops {budget:g} --epochs {epochs} --out {out_dir}")
    request = CompressSettings(model=str(float_path), data="digits", out=str(out_dir), arch="cgmq_cli.models:DigitsCNN",
                               budget=Budget(rel_bops=budget), batch_size=32, train=TrainConfig(epochs=epochs))
    with _terminate_as_interrupt(), render.TrainProgress() as progress:
        result = run_compress(request, progress, force=force)
    render.info(f"3/4 cgmq report {out_dir}")
    render.stdout().print(rep.rich_report(result.report))
    from cgmq_cli.deploy import export_run

    render.info(f"4/4 cgmq export {out_dir} --onnx (verified in onnxruntime)")
    with _terminate_as_interrupt():
        render.export_summary(export_run(out_dir, None))


def main() -> None:
    """Console-script entry point."""
    app()
