"""The compress pipeline: settings -> run directory with a model that is within budget.

    load model, data, profile -> prepare -> feasibility check -> run dir -> calibrate
        -> CGMQ training (checkpoint after every epoch) -> report.json, model.pt, latest

``cost`` in report.json is recomputed from the final integer widths, never
taken from training state.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from cgmq_cli import __version__, api, atomic, augment, checkpoint, cost, data, distributed, losses, run_files, rundir
from cgmq_cli.distributed import DistContext
from cgmq_cli.errors import (CgmqError, CheckpointError, InfeasibleBudgetError, InterruptedRun,
                             OutputError, TrainingError, UsageError, is_interrupt)
from cgmq_cli.profiles import HardwareProfile
from cgmq_cli.sanitize import cut
from cgmq_cli.qmodel import QuantizedModel
from cgmq_cli.saved_run import code_specs, profile_yaml, resolve_profile, save_model, vet_code
from cgmq_cli.trainer import Event, Trainer, TrainConfig, TrainState, evaluate

if TYPE_CHECKING:
    from cgmq_cli.sweep import Shared


@dataclass(frozen=True)
class CompressSettings:
    """Everything a run needs, resolved from flags, the project file and defaults."""

    model: str
    data: str
    out: str
    budget: cost.Budget
    arch: str | None = None
    trust: bool = False
    leaves: tuple[str, ...] = ()
    input_shape: tuple[int, ...] | None = None
    profile: str | None = None
    weight_bits: tuple[int, ...] | None = None
    act_bits: tuple[int, ...] | None = None
    subset: int | None = None
    batch_size: int = 64
    workers: int = 0
    augment: str = "none"  # training-data augmentation: none, or a name of cgmq_cli.augment.AUGMENTATIONS
    seed: int = 0
    loss: str | None = None
    amp: bool = False  # CUDA autocast (float16) for the model; quantizer math stays float32
    train: TrainConfig = field(default_factory=TrainConfig)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["budget"] = self.budget.as_dict()
        return out


@dataclass(frozen=True)
class CompressResult:
    run_dir: Path
    report: dict


def check_budget(qm: QuantizedModel, budget: cost.Budget, profile: HardwareProfile) -> list[str]:
    """Refuse infeasible budgets before training; return notes (e.g. no quantization needed)."""
    if not budget.limits():
        raise UsageError("no budget given", "pass --budget-bops, --budget-rel-bops or --budget-weight-bytes "
                         "(or set budgets in cgmq.yaml or the profile)")
    if budget.cost is not None and profile.cost_table is None:
        raise UsageError(f"--budget-cost needs a profile with a cost table; {profile.name} counts BOPs",
                         "use --budget-bops, or a profile such as npu-4-8")
    mac_cost = profile.mac_cost if profile.cost_table else None
    lowest = cost.extreme_cost(qm.shapes, qm.allowed(), mac_cost, lowest=True, extras=qm.extras).as_dict()
    for name, limit in budget.limits().items():
        if lowest[name] > limit:
            raise InfeasibleBudgetError(
                f"budget {name} = {limit:g} is below the minimum reachable {lowest[name]:g} "
                f"(every tensor at its narrowest width allowed by profile {profile.name})",
                f"raise the budget to at least {lowest[name]:g}, or use a profile that allows narrower widths")
    highest = cost.extreme_cost(qm.shapes, qm.allowed(), mac_cost, lowest=False, extras=qm.extras)
    if budget.is_satisfied_by(highest):
        return ["the budget is above the cost at the widest allowed widths: no quantization is needed to meet it"]
    return []


def _build(settings: CompressSettings, run_dir: Path | None = None) -> tuple[nn.Module, QuantizedModel, data.DataBundle, HardwareProfile, checkpoint.ModelSource]:
    backend = distributed.missing_backend(settings.train.device)
    if backend is not None:
        raise UsageError(f"--device {settings.train.device}: {backend} is not available on this machine",
                         "use --device cpu")
    profile = resolve_profile(settings, run_dir)
    model, source = checkpoint.load_model(settings.model, settings.arch, settings.trust)
    if source.fixed_batch is not None:
        raise checkpoint.fixed_batch_error(settings.model, source.fixed_batch)
    bundle = data.load_data(settings.data, settings.subset, settings.seed)
    # the quantized model shares the float model's parameters; distillation needs the float model as it is
    shared = copy.deepcopy(model) if settings.train.distill > 0 else model
    qm = api.prepare(shared, bundle.sample_shape, settings.leaves, profile, bundle.sample_dtype)
    return model, qm, bundle, profile, source


def input_paths(settings: CompressSettings) -> tuple[Path, ...]:
    """Files and folders the run reads: a --force replacement must never delete one of them."""
    paths = []
    if not settings.model.startswith(checkpoint.TORCHVISION) or Path(settings.model).exists():
        paths.append(Path(settings.model))
    for spec in (settings.arch, settings.loss, settings.data):
        target = (spec or "").rpartition(":")[0]
        if target.endswith(".py"):
            paths.append(Path(target))
    head, sep, rest = settings.data.partition(":")
    if sep and head in data.BUILTIN and rest:
        paths.append(Path(rest.rsplit("@", 1)[0] if head == "imagefolder" else rest))
    if settings.profile and (Path(settings.profile).suffix in (".yaml", ".yml") or "/" in settings.profile):
        paths.append(Path(settings.profile))
    return tuple(p.expanduser() for p in paths)


def _report(settings: CompressSettings, qm: QuantizedModel, profile: HardwareProfile, float_acc: float,
            quant_acc: float, state: TrainState, seconds: float, source: checkpoint.ModelSource, run_dir: Path,
            tensors: list[dict]) -> dict:
    summary = qm.cost(profile.mac_cost if profile.cost_table else None)
    return {
        "cgmq_version": __version__,
        "run": run_dir.name,
        "model": source.as_dict(),
        "profile": profile.name,
        "data": settings.data,
        "augment": settings.augment,
        "budget": settings.budget.as_dict(),
        "cost": summary.as_dict(),
        "feasible": settings.budget.is_satisfied_by(summary),
        "accuracy": {"float": float_acc, "quantized": quant_acc},
        "layers": [{"name": l.name, "op": l.op, "macs": l.macs, "params": l.params, "bits_w": l.bits_w,
                    "bits_a": l.bits_a, "bops": l.bops, "weight_bytes": l.weight_bytes} for l in summary.layers],
        "float_ops": [op.as_dict() for op in qm.float_ops],
        "epochs": state.epoch,
        "seconds": seconds,
        "history": state.history,
        "tensors": tensors,
    }


def _log_line(event: Event) -> str:
    fields = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.data.items()
                      if k not in ("repaired", "filled"))
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} epoch={event.epoch + 1} {event.kind} {fields}"


def _on_main(ctx: DistContext, step: Callable[[], object]) -> object:
    """Run ``step`` on rank 0; every rank learns whether it worked (and fails with rank 0's error)."""
    error, result = None, None
    if ctx.is_main:
        try:
            result = step()
        except CgmqError as exc:
            error = exc
    if not ctx.all_true(error is None):
        raise error or UsageError("rank 0 could not prepare the run directory")
    return result


def _start_run_dir(settings: CompressSettings, run_dir: Path, force: bool, ctx: DistContext, files: dict) -> rundir.RunDir | None:
    """Rank 0 creates (or replaces) the run directory, locked; every rank learns whether that worked."""

    def start() -> rundir.RunDir:
        run = rundir.prepare(run_dir, force, input_paths(settings))
        try:
            atomic.write_json(run_dir / "config.json", files["config"])
            atomic.write_text(run_dir / "profile.yaml", files["profile"])
        except BaseException:
            run.discard()
            raise
        return run

    return _on_main(ctx, start)  # type: ignore[return-value]


def compress(settings: CompressSettings, on_event: Callable[[Event], None] | None = None,
             force: bool = False, resume: bool = False, shared: "Shared | None" = None) -> CompressResult:
    """Run (or resume) a compression; returns the run directory and its report.

    Under torchrun (WORLD_SIZE > 1) every rank trains on its shard of each
    global batch; only rank 0 writes the run directory and reports events.
    Every setting, the model, the data and the budget are checked before the
    run directory is created or replaced. ``shared`` (:func:`cgmq_cli.sweep.shared_start`
    of the same model and data) supplies the float accuracy and the calibration.
    """
    ctx = distributed.from_env(settings.train.device)
    try:
        return _compress(settings, on_event, force, resume, ctx, shared)
    finally:
        distributed.shutdown(ctx)


def resume(run_dir: Path, on_event: Callable[[Event], None] | None = None, trust: bool = False,
           notify: Callable[[str], None] | None = None) -> CompressResult:
    """Continue an interrupted run with its saved settings (checked like flags); trust only from ``trust``."""
    from cgmq_cli import settings as settings_mod

    run_dir = Path(run_dir)
    if rundir.is_finished(run_dir):
        raise UsageError(f"{run_dir} is finished (report.json and model.pt exist); there is nothing to resume",
                         f"see it with `cgmq report {run_dir}`, or start a new run")
    config = run_files.read_config(run_dir)
    request = settings_mod.from_config(config["settings"], str(run_dir / "config.json"))
    request = replace(request, out=str(run_dir), trust=trust)
    source = config["source"]
    if source.get("sha256"):  # the checkpoint continues training of that very model
        if not checkpoint.source_unchanged(source):
            raise UsageError(f"{run_dir} was started from {Path(source['model'])}, which is missing or changed since",
                             "restore that model file to resume, or start a new run")
    vet_code(run_dir, code_specs(request, request.arch), trust, notify)
    return compress(request, on_event, resume=True)


def _compress(settings: CompressSettings, on_event: Callable[[Event], None] | None, force: bool, resume: bool,
              ctx: DistContext, shared: "Shared | None" = None) -> CompressResult:
    on_event = (on_event or (lambda e: None)) if ctx.is_main else (lambda e: None)
    device = distributed.device_for(ctx, settings.train.device)
    settings_run = replace(settings, train=replace(settings.train, device=device))
    run_dir = Path(settings.out)
    run = _on_main(ctx, lambda: rundir.open_run(run_dir)) if resume else None
    try:
        if not resume:
            _on_main(ctx, lambda: rundir.check_new_run(run_dir, force, input_paths(settings)))
        torch.manual_seed(settings.seed)
        model, qm, bundle, profile, source = _build(settings, run_dir if resume else None)
        notes = check_budget(qm, settings.budget, profile)
        loss_fn = losses.task_loss(settings.loss)
        augmentation = augment.resolve(settings.augment, bundle.name, bundle.sample_shape, bundle.sample_dtype)
        train_loader, val_loader = data.make_loaders(bundle, settings.batch_size, settings.workers, settings.seed,
                                                     distributed=ctx.enabled, augment=augmentation)
        float_acc = (shared.float_accuracy if shared is not None
                     else evaluate(model.to(device), val_loader, loss_fn, device, ctx)["accuracy"])
        if shared is not None:
            qm.gm.load_state_dict(shared.calibrated)
        qm.gm.to(device)
        if not resume and shared is None:
            qm.calibrate(data.calibration_batch(bundle, 256, settings.seed).to(device))
        trainer = Trainer(qm, train_loader, val_loader, settings.budget, settings_run.train,
                          profile.mac_cost if profile.cost_table else None, loss_fn, lambda e: None,
                          dist=ctx, amp=settings.amp, seed=settings.seed,
                          teacher=model.to(device) if settings.train.distill > 0 else None,
                          train_loss_fn=losses.training_loss(settings.loss, settings.train.label_smoothing, loss_fn))
        seconds = _restore(run_dir, qm, trainer) if resume else 0.0
        if not resume:  # everything is checked: only now is the run directory created (or replaced)
            run = _start_run_dir(settings, run_dir, force, ctx, {
                "config": {"cgmq_version": __version__, "settings": settings.as_dict(), "source": source.as_dict(),
                           "sample_shape": list(bundle.sample_shape), "sample_dtype": bundle.sample_dtype},
                "profile": profile_yaml(profile)})
        return _train(settings, run_dir, run, ctx, on_event, qm, trainer, val_loader, loss_fn, profile, source,
                      float_acc, notes, seconds, resume)
    finally:
        if run is not None:
            run.release()


def _train(settings: CompressSettings, run_dir: Path, run: rundir.RunDir | None, ctx: DistContext,
           on_event: Callable[[Event], None], qm: QuantizedModel, trainer: Trainer, val_loader, loss_fn: Callable,
           profile: HardwareProfile, source: checkpoint.ModelSource, float_acc: float, notes: list[str],
           seconds: float, resume: bool) -> CompressResult:
    started = time.time() - seconds
    saved_once = resume
    log = None
    try:
        log = rundir.RunLog(run_dir / "train.log") if ctx.is_main else None

        def emit(event: Event) -> None:
            if log is not None:
                log.write(_log_line(event))
            on_event(event)

        trainer.on_event = emit
        for note in notes:
            emit(Event("info", 0, {"message": note}))
        if ctx.enabled:
            emit(Event("info", 0, {"message": f"distributed: {ctx.world} processes, global batch {settings.batch_size}"}))
        if resume:
            emit(Event("info", trainer.state.epoch, {"message": f"resumed after epoch {trainer.state.epoch}"}))
        run_id = run.id if run is not None else ""

        def save(state: TrainState) -> None:
            if ctx.is_main:
                _save_checkpoint(run_dir, qm, state, time.time() - started, run_id)

        if not resume:
            save(trainer.state)
            saved_once = True
        state = trainer.run(save)
        # evaluate, then model.pt, then report.json (finished once both exist); a failure here resumes to here
        quant_acc = evaluate(qm.gm, val_loader, loss_fn, trainer.config.device, ctx)["accuracy"]
        report = _report(settings, qm, profile, float_acc, quant_acc, state, time.time() - started, source, run_dir,
                         trainer.explain())
        if ctx.is_main:
            save_model(run_dir / "model.pt", qm, run_id or None)
            atomic.write_json(run_dir / "report.json", report)
            if run is not None:
                run.finished()  # a run this one replaced (--force) was kept until now
            note = rundir.point_latest(run_dir)
            if note:
                on_event(Event("info", state.epoch, {"message": note}))
        ctx.barrier()
    except BaseException as exc:  # one handler: an interrupt may come out of a C extension as any other error
        # nothing trained yet: the run directory is removed, or the run it was replacing (--force) is put back
        replacing = run is not None and run.replacing
        fresh = run is not None and (not saved_once or (replacing and trainer.state.epoch == 0))
        if is_interrupt(exc):
            if fresh:
                run.discard()
                raise InterruptedRun(f"interrupted before the first epoch; the run it was replacing is back in {run_dir}"
                                     if replacing else
                                     f"interrupted before the first checkpoint; {run_dir} was removed") from None
            held = f" (the run it replaces stays in {run_dir / rundir.HELD} until it finishes)" if replacing else ""
            raise InterruptedRun(f"interrupted; {run_dir} keeps the state after epoch {trainer.state.epoch}",
                                 f"continue with: cgmq compress --resume {run_dir}{held}") from None
        if ctx.enabled and isinstance(exc, RuntimeError) and not isinstance(exc, CgmqError):
            # gloo/NCCL: a peer died or hung; every rank stops
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TrainingError(f"rank {ctx.rank}: another process of this distributed run failed ({cut(first, 160)}); "
                                f"the job stops, {run_dir} keeps the state after epoch {trainer.state.epoch}",
                                f"continue with: cgmq compress --resume {run_dir} (any number of processes)") from None
        if fresh:
            run.discard()
            raise
        if isinstance(exc, OutputError):
            raise OutputError(exc.message, f"{exc.hint or 'fix the cause'}; then continue with: "
                                           f"cgmq compress --resume {run_dir}") from None
        raise
    finally:
        if log is not None:
            log.close()
    return CompressResult(run_dir, report)


def _save_checkpoint(run_dir: Path, qm: QuantizedModel, state: TrainState, seconds: float, run_id: str = "") -> None:
    atomic.save_torch(run_dir / "checkpoint.pt", {
        "model": qm.gm.state_dict(), "epoch": state.epoch, "history": state.history,
        "optimizer": state.optimizer, "bad_batches": state.bad_batches, "seconds": seconds, "run": run_id or None,
        "trained_widths": state.trained_widths})


def _restore(run_dir: Path, qm: QuantizedModel, trainer: Trainer) -> float:
    ckpt = run_files.read_torch_state(run_dir, "checkpoint.pt", {"model": dict, "epoch": int, "history": list,
                                                                "bad_batches": int})
    if not 0 <= ckpt["epoch"] <= len(trainer.config.schedule()):
        raise CheckpointError(f"{run_dir / 'checkpoint.pt'} records epoch {ckpt['epoch']}, outside this run's "
                              f"{len(trainer.config.schedule())} epochs", "start the run again")
    try:
        qm.gm.load_state_dict(ckpt["model"])
        qm.gm.to(trainer.config.device)
        if ckpt.get("optimizer"):
            trainer.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{run_dir / 'checkpoint.pt'} does not fit this run's model (from another run, or edited): "
                              f"{cut(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 120)}",
                              "start the run again") from None
    trained = ckpt.get("trained_widths")
    trainer.state = TrainState(epoch=ckpt["epoch"], history=list(ckpt["history"]), optimizer=ckpt.get("optimizer"),
                               bad_batches=ckpt["bad_batches"],
                               trained_widths=dict(trained) if isinstance(trained, dict) else None)
    seconds = ckpt.get("seconds", 0.0)
    return float(seconds) if isinstance(seconds, (int, float)) else 0.0
