"""Typer app: arguments -> api -> rendering, inside the one error boundary (:mod:`cgmq_cli.boundary`).

Domain errors (:class:`CgmqError`) become ``error: <message>`` and an optional
``hint: ...`` on stderr with the kind's exit code; any other exception is an
internal error (exit 1). With ``--json`` (or ``--format json``) the boundary
also prints exactly one JSON object on stdout for every failure:
``{"error", "hint", "exit_code"}``, merged into the command's result where
it has one (check, verify, sweep). Set ``CGMQ_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, List, Optional

import typer

from cgmq_cli import __version__, api, render
from cgmq_cli.boundary import CgmqGroup, OptionalValue, terminate_as_interrupt
from cgmq_cli.errors import CheckFailedError, UsageError
from cgmq_cli.sanitize import clean

# Nothing here imports torch, onnx or onnxruntime at start-up: `cgmq --help`, `profiles`, `report` and
# `check` never need them (tests/e2e/test_startup.py); the commands that do import them through api.


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
DataOpt = typer.Option(None, "--data", help="Training data: digits, mnist[:DIR], fashion-mnist[:DIR], cifar10[:DIR], imagefolder:DIR, module:fn or file.py:fn.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object to stdout (also on failure: error, hint, exit_code).")

# Options of compress that sweep shares.
SubsetOpt = typer.Option(None, "--subset", help="Use only N training examples (a fixed seeded subset).")
BatchOpt = typer.Option(None, "--batch-size", help="Batch size (default 64).")
WorkersOpt = typer.Option(None, "--workers", help="DataLoader worker processes (default 0).")
AugmentOpt = typer.Option(None, "--augment", help="Training-data augmentation: none (default) or hflip (a seeded horizontal flip of half the training images each epoch).")
WeightBitsOpt = typer.Option(None, "--weight-bits", help="Narrow the profile's weight widths, e.g. 4,8.")
ActBitsOpt = typer.Option(None, "--act-bits", help="Narrow the profile's activation widths, e.g. 4,8.")
BopsOpt = typer.Option(None, "--budget-bops", help="Budget in BOPs (sum of MACs x b_w x b_a), e.g. 1e8.")
RelBopsOpt = typer.Option(None, "--budget-rel-bops", help="Budget in percent of the float 32x32 BOPs, e.g. 1.5.")
BytesOpt = typer.Option(None, "--budget-weight-bytes", help="Budget on the weight memory in bytes, e.g. 65536.")
CostOpt = typer.Option(None, "--budget-cost", help="Budget in the profile's cost-table unit (e.g. cycles).")
EpochsOpt = typer.Option(None, "--epochs", help="Total epochs, split between gate and weight epochs (default 6).")
LrOpt = typer.Option(None, "--lr", help="Peak learning rate of weights and steps (Adam, cosine decay over the weight-training steps; default 1e-3).")
SeedOpt = typer.Option(None, "--seed", help="Random seed: the same seed repeats a run on the same machine.")
DeviceOpt = typer.Option(None, "--device", help="cpu (default) or cuda.")
LossOpt = typer.Option(None, "--loss", help="Loss as module:fn (default cross-entropy).")
GateStepsOpt = typer.Option(None, "--gate-steps", help="Minimum batches per gate epoch (default 300; 0: one pass over the data).")
FinishOpt = typer.Option(None, "--finish", help="Gate-epoch finish: repair-fill (default) or constraint (plain CGGD).")
AmpOpt = typer.Option(False, "--amp", help="CUDA mixed precision (float16 autocast) for the model; quantizers stay float32.")


def model_request(model: str, arch: Optional[str], trust: bool, leaf: Optional[List[str]], input_shape: Optional[str]) -> api.ModelRequest:
    from cgmq_cli import settings

    return api.ModelRequest(model=model, arch=arch, trust=trust, leaves=settings.check_setting("leaf", leaf or [], "--leaf"),
                            input_shape=settings.parse_shape(input_shape, "--input-shape"))


@app.command()
def inspect(
    model: Optional[str] = typer.Argument(None, help="Model file (.pt2, state_dict, trusted pickle) or torchvision:NAME; may come from cgmq.yaml."),
    arch: Optional[str] = ArchOpt,
    input_shape: Optional[str] = ShapeOpt,
    leaf: Optional[List[str]] = LeafOpt,
    trust_checkpoint: bool = TrustOpt,
    profile: Optional[str] = ProfileOpt,
    input_dtype: str = typer.Option("float32", "--input-dtype", help="Input element type: float32, or int64 for token ids."),
    data_spec: Optional[str] = typer.Option(None, "--data", help="A data spec (as for compress) whose examples give the input shape, e.g. digits."),
    as_json: bool = JsonOpt,
) -> None:
    """List the quantizable layers of a model with MACs, parameters, totals and the compute left in float."""
    if input_dtype not in ("float32", "int64"):
        raise UsageError(f"--input-dtype {input_dtype!r}: expected float32 or int64")
    from cgmq_cli import settings

    project, _ = settings.read_project()  # model, arch, input_shape, leaf, profile, data: flags win
    model = model or project.get("model")
    if not model:
        raise UsageError("no model given", "pass MODEL (a file or torchvision:NAME), or set `model` in cgmq.yaml")
    leaves = leaf or list(project.get("leaf") or [])
    shape = input_shape if input_shape is not None else project.get("input_shape")
    shape_text = ",".join(map(str, shape)) if isinstance(shape, tuple) else shape
    request = replace(model_request(model, arch or project.get("arch"), trust_checkpoint, leaves, shape_text),
                      input_dtype=input_dtype)
    result = api.inspect(request, profile or project.get("profile"), data_spec or project.get("data"))
    for note in result.notes:
        render.info(f"note: {note}")
    if as_json:
        render.json_out(result.as_dict())
    else:
        render.inspect_table(result)


@app.command()
def profiles(as_json: bool = JsonOpt) -> None:
    """List the hardware profiles shipped in presets/."""
    from cgmq_cli.profiles import list_presets

    rows = [{"name": p.name, "description": p.description, "weight_bits": list(p.weight_bits),
             "act_bits": list(p.act_bits), "input_bits": p.input_bits,
             "cost": "table" if p.cost_table else "bops"} for p in list_presets()]
    if as_json:
        render.json_out({"profiles": rows})
    else:
        render.profiles_table(rows)


def _compress_flags(**flags: Any) -> dict:
    """The compress flags as settings keys (None: not given)."""
    flags["trust"] = flags.pop("trust_checkpoint") or None
    flags["amp"] = flags["amp"] or None
    return flags


def _budget_flags(bops: Optional[str], rel_bops: Optional[str], weight_bytes: Optional[str], cost: Optional[str]) -> dict:
    return {"bops": bops, "rel_bops": rel_bops, "weight_bytes": weight_bytes, "cost": cost}


def _schedule(request: Any) -> list[str]:
    return request.train.schedule()


@app.command()
def compress(
    model: Optional[str] = typer.Argument(None, help="Model file (.pt2, state_dict, trusted pickle) or torchvision:NAME; may come from cgmq.yaml."),
    arch: Optional[str] = ArchOpt,
    input_shape: Optional[str] = ShapeOpt,
    leaf: Optional[List[str]] = LeafOpt,
    trust_checkpoint: bool = TrustOpt,
    data_spec: Optional[str] = DataOpt,
    subset: Optional[int] = SubsetOpt,
    batch_size: Optional[int] = BatchOpt,
    workers: Optional[int] = WorkersOpt,
    augment: Optional[str] = AugmentOpt,
    profile: Optional[str] = ProfileOpt,
    weight_bits: Optional[str] = WeightBitsOpt,
    act_bits: Optional[str] = ActBitsOpt,
    budget_bops: Optional[str] = BopsOpt,
    budget_rel_bops: Optional[str] = RelBopsOpt,
    budget_weight_bytes: Optional[str] = BytesOpt,
    budget_cost: Optional[str] = CostOpt,
    epochs: Optional[int] = EpochsOpt,
    lr: Optional[float] = LrOpt,
    seed: Optional[int] = SeedOpt,
    device: Optional[str] = DeviceOpt,
    loss: Optional[str] = LossOpt,
    out: Optional[str] = typer.Option(None, "--out", help="Run directory (default runs/<model>-<time>)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run directory."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue an interrupted run from its last checkpoint (--trust-checkpoint may be added)."),
    gate_steps: Optional[int] = GateStepsOpt,
    finish: Optional[str] = FinishOpt,
    amp: bool = AmpOpt,
    as_json: bool = typer.Option(False, "--json", help="Print report.json to stdout; logs go to stderr (on failure: error, hint, exit_code)."),
) -> None:
    """Compress MODEL to mixed precision within the budget(s), learning every width by CGMQ."""
    from cgmq_cli import report as rep
    from cgmq_cli import rundir, settings

    flags = _compress_flags(model=model, arch=arch, input_shape=input_shape, leaf=leaf, trust_checkpoint=trust_checkpoint,
                            data=data_spec, subset=subset, batch_size=batch_size, workers=workers, augment=augment,
                            profile=profile,
                            weight_bits=weight_bits, act_bits=act_bits, epochs=epochs, lr=lr, seed=seed, device=device,
                            loss=loss, out=out, gate_steps=gate_steps, finish=finish, amp=amp)
    budget_flags = _budget_flags(budget_bops, budget_rel_bops, budget_weight_bytes, budget_cost)
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
        with terminate_as_interrupt(), render.TrainProgress() as progress:
            result = api.resume(run_dir, progress, trust=trust_checkpoint, notify=render.info)
    else:
        request = settings.resolve_compress(flags, budget_flags)
        with terminate_as_interrupt(), render.TrainProgress(schedule=_schedule(request)) as progress:
            result = api.compress(request, progress, force=force)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    if as_json:
        render.json_out(result.report)
    else:
        render.compress_summary(result.report, result.run_dir, rep.notes(result.report))


@app.command()
def sweep(
    model: Optional[str] = typer.Argument(None, help="Model file (.pt2, state_dict, trusted pickle) or torchvision:NAME; may come from cgmq.yaml."),
    budgets: str = typer.Option(..., "--budgets", help="The swept budget: KEY=V1,V2,... with KEY bops, rel_bops, weight_bytes or cost, e.g. rel_bops=0.6,1,2,4; with --max-accuracy-drop the interval LOW,HIGH."),
    max_accuracy_drop: Optional[float] = typer.Option(None, "--max-accuracy-drop", help="Find the smallest budget whose accuracy drop (float minus quantized, points) is at most D, by bisection."),
    max_runs: Optional[int] = typer.Option(None, "--max-runs", help="With --max-accuracy-drop: at most N compress runs (2 to 6; default 6)."),
    arch: Optional[str] = ArchOpt,
    input_shape: Optional[str] = ShapeOpt,
    leaf: Optional[List[str]] = LeafOpt,
    trust_checkpoint: bool = TrustOpt,
    data_spec: Optional[str] = DataOpt,
    subset: Optional[int] = SubsetOpt,
    batch_size: Optional[int] = BatchOpt,
    workers: Optional[int] = WorkersOpt,
    augment: Optional[str] = AugmentOpt,
    profile: Optional[str] = ProfileOpt,
    weight_bits: Optional[str] = WeightBitsOpt,
    act_bits: Optional[str] = ActBitsOpt,
    budget_bops: Optional[str] = typer.Option(None, "--budget-bops", help="A fixed BOPs budget every point also meets."),
    budget_rel_bops: Optional[str] = typer.Option(None, "--budget-rel-bops", help="A fixed relative-BOPs budget (percent) every point also meets."),
    budget_weight_bytes: Optional[str] = typer.Option(None, "--budget-weight-bytes", help="A fixed weight-memory budget (bytes) every point also meets."),
    budget_cost: Optional[str] = typer.Option(None, "--budget-cost", help="A fixed cost-table budget every point also meets."),
    epochs: Optional[int] = EpochsOpt,
    lr: Optional[float] = LrOpt,
    seed: Optional[int] = SeedOpt,
    device: Optional[str] = DeviceOpt,
    loss: Optional[str] = LossOpt,
    out: Optional[str] = typer.Option(None, "--out", help="Sweep directory (default runs/sweep-<model>-<time>)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing sweep directory that cgmq made."),
    gate_steps: Optional[int] = GateStepsOpt,
    finish: Optional[str] = FinishOpt,
    amp: bool = AmpOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Pareto sweep: one compress per budget (float evaluation and calibration shared), a table and a plot."""
    from cgmq_cli import settings
    from cgmq_cli import sweep as sweep_mod

    key, values = sweep_mod.parse_budgets(budgets)
    if max_accuracy_drop is None and max_runs is not None:
        raise UsageError("--max-runs bounds the search of --max-accuracy-drop; a plain sweep runs every budget",
                         "add --max-accuracy-drop D, or drop --max-runs")
    if max_accuracy_drop is not None and len(values) != 2:
        raise UsageError(f"--max-accuracy-drop searches an interval: give --budgets KEY=LOW,HIGH, not {len(values)} "
                         "value(s)", f"e.g. --budgets {key}=0.5,8")
    fixed = _budget_flags(budget_bops, budget_rel_bops, budget_weight_bytes, budget_cost)
    if fixed.get(key) is not None:
        raise UsageError(f"--budget-{key.replace('_', '-')} and --budgets {key}=... both set the swept budget",
                         f"drop --budget-{key.replace('_', '-')}")
    flags = _compress_flags(model=model, arch=arch, input_shape=input_shape, leaf=leaf, trust_checkpoint=trust_checkpoint,
                            data=data_spec, subset=subset, batch_size=batch_size, workers=workers, augment=augment,
                            profile=profile,
                            weight_bits=weight_bits, act_bits=act_bits, epochs=epochs, lr=lr, seed=seed, device=device,
                            loss=loss, out=None, gate_steps=gate_steps, finish=finish, amp=amp)
    fixed[key] = values[-1]  # any value: the settings must hold a budget to be complete; each point sets its own
    request = settings.resolve_compress(flags, fixed)
    target = Path(out or settings.default_out(request.model, "sweep"))  # not cgmq.yaml's out
    with terminate_as_interrupt(), render.TrainProgress(schedule=_schedule(request)) as progress:
        if max_accuracy_drop is None:
            result = api.sweep(request, key, values, target, progress, render.info, force)
        else:
            drop = settings.parse_threshold(max_accuracy_drop, "--max-accuracy-drop")
            result = api.sweep_target(request, key, values[0], values[-1], drop, target,
                                      sweep_mod.MAX_RUNS if max_runs is None else max_runs, progress, render.info, force)
    if max_accuracy_drop is not None and result.chosen is None:
        raise CheckFailedError(f"no budget up to {key}={values[-1]:g} kept the accuracy drop within "
                               f"{max_accuracy_drop:g} points (see {result.path})",
                               "raise the upper budget, or allow a larger drop").with_result(result.table)
    if as_json:
        render.json_out(result.table)
    else:
        _show_sweep(result.table, result.path)


def _show_sweep(table: dict, path: Path) -> None:
    from cgmq_cli import report as rep

    files = [name for name in ("sweep.json", "sweep.md", "sweep.csv", "sweep.png") if (path / name).is_file()]
    render.show(*rep.sweep_table(table), f"wrote {', '.join(str(path / f) for f in files)}")


def _load_reports(runs: Optional[List[str]]) -> list[tuple[Path, dict]]:
    dirs = [api.resolve(r) for r in runs] if runs else [api.resolve(None)]
    return [(d, api.load_report(d)) for d in dirs]


@app.command()
def report(
    runs: Optional[List[str]] = typer.Argument(None, help="Run directories (default runs/latest); two or more are compared side by side; a sweep directory shows its table."),
    fmt: str = typer.Option("table", "--format", help="table (default), json, markdown or csv."),
    as_json: bool = typer.Option(False, "--json", help="The same as --format json: one JSON object on stdout."),
    explain: bool = typer.Option(False, "--explain", help="Why these bits: per tensor its width, allowed widths, the predicted loss change and cost of one step up and down, and the budget that bound it."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write a PNG: bits per layer, each layer's share of BOPs and why these bits (a sweep: accuracy against cost)."),
) -> None:
    """Show a run's per-layer widths, cost against each budget and accuracy (or a sweep's table)."""
    from cgmq_cli import report as rep, report_explain as why

    if as_json:
        if fmt not in ("table", "json"):
            raise UsageError(f"--json and --format {fmt} ask for two formats", "pass one of them")
        fmt = "json"
    if fmt not in ("table", "json", "markdown", "csv"):
        raise UsageError(f"--format {fmt!r}: expected table, json, markdown or csv")
    dirs = [api.resolve(r) for r in runs] if runs else [api.resolve(None)]
    sweeps = [d for d in dirs if api.is_sweep(d)]
    if sweeps:
        if len(dirs) > 1:
            raise UsageError(f"{sweeps[0]} is a sweep directory; show it on its own", f"cgmq report {sweeps[0]}")
        if explain:
            raise UsageError(f"{dirs[0]} is a sweep; --explain shows one run",
                             f"pass one of its runs, e.g. cgmq report {dirs[0]}/<run> --explain")
        return _report_sweep(api.load_sweep(dirs[0]), dirs[0], fmt, plot)
    reports = [api.load_report(d) for d in dirs]
    if explain:
        if len(reports) > 1:
            raise UsageError("--explain shows one run; pass a single run directory")
        text = {"json": None, "csv": why.explain_csv, "markdown": why.explain_markdown}
        why.explained(reports[0], str(dirs[0]))  # a run without `tensors` is one line before any output
    if plot is not None:
        rep.plot(reports, plot)
        render.info(f"wrote {plot}")
    if explain:
        if fmt == "json":
            render.json_out({"run": reports[0]["run"], "tensors": why.explained(reports[0], str(dirs[0]))})
        elif fmt == "table":
            render.show(*why.explain_table(reports[0], str(dirs[0])))
        else:
            sys.stdout.write(text[fmt](reports[0], str(dirs[0])))
    elif fmt == "json":
        render.json_out(reports[0] if len(reports) == 1 else {"runs": reports})
    elif fmt == "csv":
        if len(reports) > 1:
            raise UsageError("--format csv shows one run; pass a single run directory")
        sys.stdout.write(rep.csv_text(reports[0]))
    elif fmt == "markdown":
        sys.stdout.write(rep.markdown(reports[0]) if len(reports) == 1 else rep.comparison_markdown(reports))
    else:
        render.show(*(rep.blocks(reports[0]) if len(reports) == 1 else [rep.comparison_table(reports)]))


def _report_sweep(table: dict, path: Path, fmt: str, plot: Optional[Path]) -> None:
    from cgmq_cli import report as rep
    from cgmq_cli import sweep as sweep_mod

    changed = sweep_mod.changed_points(path, table)
    if changed:
        render.info(f"note: {', '.join(changed[:3])}{' and more' if len(changed) > 3 else ''} in {path} changed after "
                    "the sweep (replaced, removed or edited); the table shows the sweep's own numbers")
    if plot is not None:
        rep.sweep_plot(table, plot)
        render.info(f"wrote {plot}")
    if fmt == "json":
        render.json_out(table)
    elif fmt == "csv":
        sys.stdout.write(rep.sweep_csv(table))
    elif fmt == "markdown":
        sys.stdout.write(rep.sweep_markdown(table))
    else:
        render.show(*rep.sweep_table(table))


@app.command()
def check(
    run: Optional[str] = typer.Argument(None, help="Run directory (default runs/latest)."),
    max_bops: Optional[str] = typer.Option(None, "--max-bops", help="Fail when the run's BOPs exceed N."),
    max_rel_bops: Optional[str] = typer.Option(None, "--max-rel-bops", help="Fail when relative BOPs exceed P percent."),
    max_weight_bytes: Optional[str] = typer.Option(None, "--max-weight-bytes", help="Fail when weight memory exceeds N bytes."),
    min_accuracy: Optional[float] = typer.Option(None, "--min-accuracy", help="Fail when quantized accuracy (percent) is below A."),
    max_accuracy_drop: Optional[float] = typer.Option(None, "--max-accuracy-drop", help="Fail when float minus quantized accuracy exceeds D points."),
    min_coverage: Optional[float] = typer.Option(None, "--min-coverage", help="Fail when less than P percent of the model's MACs run in quantized layers."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout: the checks, and on failure also error, hint, exit_code."),
) -> None:
    """CI gate: exit 0 only when the run is within its budgets and every given threshold holds."""
    from cgmq_cli import checks, settings

    limits = dict(max_bops=settings.parse_limit(max_bops, "bops", "--max-bops"),
                  max_rel_bops=settings.parse_limit(max_rel_bops, "rel_bops", "--max-rel-bops"),
                  max_weight_bytes=settings.parse_limit(max_weight_bytes, "weight_bytes", "--max-weight-bytes"),
                  min_accuracy=settings.parse_threshold(min_accuracy, "--min-accuracy", fraction_hint=True),
                  max_accuracy_drop=settings.parse_threshold(max_accuracy_drop, "--max-accuracy-drop"),
                  min_coverage=settings.parse_threshold(min_coverage, "--min-coverage",
                                                        unit="coverage is in percent of the model's MACs"))
    (run_dir, rep_dict), = _load_reports([run] if run else None)
    results = checks.run_checks(rep_dict, **limits)
    failed = [r for r in results if not r.ok]
    payload = {"run": str(run_dir), "ok": not failed, "checks": [r.as_dict() for r in results]}
    if not as_json:
        for r in results:
            typer.echo(clean(r.line()))
    if failed:
        raise CheckFailedError(f"{len(failed)} of {len(results)} checks failed for {run_dir}").with_result(payload)
    if as_json:
        render.json_out(payload)


@app.command(cls=OptionalValue)
def export(
    run: Optional[str] = typer.Argument(None, help="Run directory (default runs/latest)."),
    onnx_path: Optional[str] = typer.Option(None, "--onnx", metavar="[PATH]", help="QDQ ONNX file to write; --onnx alone or no --onnx: RUN_DIR/model.onnx."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset: 25 (default) native int2/int4; 21-24 2-bit in int4; 13-20 8-bit containers with Clip."),
    portable: bool = typer.Option(False, "--portable", help="Containers every tested runtime loads (OpenVINO too): opset 21, 2-bit in int4, sub-8-bit inputs of 8-bit-weight layers in uint8 with Clip."),
    allow_float_fallback: bool = typer.Option(False, "--allow-float-fallback", help="Write the file even when an op the profile runs as an integer kernel would run in float in onnxruntime (a warning instead of exit 4)."),
    float_path: Optional[Path] = typer.Option(None, "--float", help="Also write your float model as you gave it (unquantized, BatchNorm unfolded; rebuilt from the run's model file), for comparison."),
    benchmark: bool = typer.Option(False, "--benchmark", help="Measure onnxruntime latency (median of repeated runs) of the files."),
    force: bool = typer.Option(False, "--force", help="Replace existing ONNX files that cgmq exported (never other files)."),
    trust_checkpoint: bool = TrustOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Export a run to ONNX QuantizeLinear/DequantizeLinear with its true widths, verified in onnxruntime."""
    if opset is not None and not 13 <= opset <= 25:
        raise UsageError(f"--opset {opset}: supported opsets are 13 to 25")
    if portable and opset is not None and opset > 21:
        raise UsageError(f"--portable writes opset 21 or older, not --opset {opset}", "drop --opset, or use 21 or lower")
    run_dir = api.resolve(run)
    with terminate_as_interrupt():
        result = api.export(run_dir, onnx_path or None, opset, float_path, benchmark, force, trust_checkpoint,
                            render.info, portable=portable, allow_float_fallback=allow_float_fallback)
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
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout: the widths read back, and when over budget also error, hint, exit_code."),
) -> None:
    """Read every layer's widths back from an ONNX file's Q/DQ nodes; compute BOPs and weight bytes."""
    from cgmq_cli import settings

    result = api.verify(onnx_file, settings.parse_limit(budget_bops, "bops", "--budget-bops"),
                        settings.parse_limit(budget_rel_bops, "rel_bops", "--budget-rel-bops"),
                        settings.parse_limit(budget_weight_bytes, "weight_bytes", "--budget-weight-bytes"),
                        runtime=runtime)
    if not as_json:
        render.verify_table(onnx_file, result.widths, result.budget["bops"], result.budget["weight_bytes"],
                            result.openvino)
    if not result.ok:
        raise CheckFailedError(result.failure, result.hint).with_result(result.as_dict())
    if as_json:
        render.json_out(result.as_dict())


@app.command()
def demo(
    out: str = typer.Option("runs/demo", "--out", help="Run directory of the demo's compression."),
    budget_rel_bops: float = typer.Option(2.0, "--budget-rel-bops", help="Budget in percent of float BOPs."),
    epochs: int = typer.Option(6, "--epochs", help="CGMQ epochs (1 to 10000)."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier demo run (and its OUT-float/ model)."),
) -> None:
    """Offline walk-through: train a small CNN on digits, compress it within a budget, report, export ONNX."""
    import torch

    from cgmq_cli import data, models, rundir, settings
    from cgmq_cli import report as rep
    from cgmq_cli.budget import Budget
    from cgmq_cli.compress import check_budget
    from cgmq_cli.profiles import load_profile
    from cgmq_cli.trainer import evaluate, train_float

    epochs = settings.check_setting("epochs", epochs, "--epochs")
    budget = settings.check_float(budget_rel_bops, "--budget-rel-bops", 0.0, 100.0)
    out_dir = Path(out)
    float_dir = out_dir.parent / f"{out_dir.name}-float"
    float_path = float_dir / "digits_cnn.pt"
    rundir.check_new_run(out_dir, force)  # both outputs and the budget are checked before anything is written
    rundir.check_demo_dir(float_dir, force)
    bundle = data.load_data("digits")
    generic = load_profile(None)
    check_budget(api.prepare(models.DigitsCNN(), bundle.sample_shape, (), generic), Budget(rel_bops=budget), generic)
    render.info(f"1/4 training a float DigitsCNN on scikit-learn's digits (offline) -> {float_path}")
    train_loader, val_loader = data.make_loaders(bundle, 32, 0, 0)
    model = train_float(models.DigitsCNN(), train_loader, epochs=15, lr=3e-3, seed=0)
    acc = evaluate(model, val_loader, torch.nn.functional.cross_entropy, "cpu")["accuracy"]
    render.info(f"    float validation accuracy {acc:.2f}%")
    rundir.write_demo_model(float_dir, float_path.name, model.state_dict())
    render.info(f"2/4 cgmq compress {float_path} --arch cgmq_cli.models:DigitsCNN --data digits "
                f"--budget-rel-bops {budget:g} --epochs {epochs} --out {out_dir}")
    request = api.settings(str(float_path), data="digits", out=str(out_dir), arch="cgmq_cli.models:DigitsCNN",
                           budget_rel_bops=budget, batch_size=32, epochs=epochs)
    with terminate_as_interrupt(), render.TrainProgress(schedule=_schedule(request)) as progress:
        result = api.compress(request, progress, force=force)
    render.info(f"3/4 cgmq report {out_dir}")
    render.show(*rep.blocks(result.report))
    render.info(f"4/4 cgmq export {out_dir} --onnx (verified in onnxruntime)")
    with terminate_as_interrupt():
        render.export_summary(api.export(out_dir, None))


def main() -> None:
    """Console-script entry point."""
    app()
