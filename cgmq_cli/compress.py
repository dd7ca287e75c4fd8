"""The compress pipeline: settings -> run directory with a model that is within budget.

    load model, data, profile -> prepare -> feasibility check -> run dir -> calibrate
        -> CGMQ training (checkpoint after every epoch) -> report.json, model.pt, latest

``cost`` in report.json is recomputed from the final integer widths, never
taken from training state.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cgmq_cli import __version__, api, checkpoint, cost, data, distributed, rundir
from cgmq_cli.distributed import DistContext
from cgmq_cli.errors import CgmqError, InfeasibleBudgetError, InterruptedRun, TrainingError, UsageError
from cgmq_cli.profiles import HardwareProfile, load_profile, parse_profile
from cgmq_cli.qmodel import QuantizedModel
from cgmq_cli.trainer import Event, Trainer, TrainConfig, TrainState, evaluate

MODEL_FORMAT = "cgmq-model/1"


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
    seed: int = 0
    loss: str | None = None
    amp: bool = False  # CUDA autocast (float16) for the model; quantizer math stays float32
    train: TrainConfig = field(default_factory=TrainConfig)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["budget"] = self.budget.as_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "CompressSettings":
        d = dict(d)
        d["budget"] = cost.Budget.from_dict(d["budget"])
        d["train"] = TrainConfig(**d["train"])
        for key in ("leaves", "input_shape", "weight_bits", "act_bits"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class CompressResult:
    run_dir: Path
    report: dict


def resolve_profile(settings: CompressSettings, run_dir: Path | None = None) -> HardwareProfile:
    """The profile, narrowed by the width flags; a run's own copy when rebuilding."""
    if run_dir is not None and (run_dir / "profile.yaml").is_file():
        import yaml

        profile = parse_profile(yaml.safe_load((run_dir / "profile.yaml").read_text()), str(run_dir / "profile.yaml"))
    else:
        profile = load_profile(settings.profile)
    return profile.narrowed(settings.weight_bits, settings.act_bits)


def check_budget(qm: QuantizedModel, budget: cost.Budget, profile: HardwareProfile) -> list[str]:
    """Refuse infeasible budgets before training; return notes (e.g. no quantization needed)."""
    if not budget.limits():
        raise UsageError("no budget given", "pass --budget-bops, --budget-rel-bops or --budget-weight-bytes "
                         "(or set budgets in cgmq.yaml or the profile)")
    if budget.cost is not None and profile.cost_table is None:
        raise UsageError(f"--budget-cost needs a profile with a cost table; {profile.name} counts BOPs",
                         "use --budget-bops, or a profile such as npu-4-8")
    mac_cost = profile.mac_cost if profile.cost_table else None
    lowest = cost.extreme_cost(qm.shapes, qm.allowed(), mac_cost, lowest=True).as_dict()
    for name, limit in budget.limits().items():
        if lowest[name] > limit:
            raise InfeasibleBudgetError(
                f"budget {name} = {limit:g} is below the minimum reachable {lowest[name]:g} "
                f"(every tensor at its narrowest width allowed by profile {profile.name})",
                f"raise the budget to at least {lowest[name]:g}, or use a profile that allows narrower widths")
    highest = cost.extreme_cost(qm.shapes, qm.allowed(), mac_cost, lowest=False)
    if budget.is_satisfied_by(highest):
        return ["the budget is above the cost at the widest allowed widths: no quantization is needed to meet it"]
    return []


def _build(settings: CompressSettings, run_dir: Path | None = None) -> tuple[nn.Module, QuantizedModel, data.DataBundle, HardwareProfile, checkpoint.ModelSource]:
    if settings.train.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {settings.train.device}: CUDA is not available on this machine", "use --device cpu")
    profile = resolve_profile(settings, run_dir)
    model, source = checkpoint.load_model(settings.model, settings.arch, settings.trust)
    bundle = data.load_data(settings.data, settings.subset, settings.seed)
    qm = api.prepare(model, bundle.sample_shape, settings.leaves, profile)
    return model, qm, bundle, profile, source


def _loss_fn(spec: str | None) -> Callable:
    if spec is None:
        return nn.functional.cross_entropy
    fn = checkpoint.import_object(spec, "--loss")
    if not callable(fn):
        raise UsageError(f"--loss {spec} is not callable")
    return fn


def _report(settings: CompressSettings, qm: QuantizedModel, profile: HardwareProfile, float_acc: float,
            quant_acc: float, state: TrainState, seconds: float, source: checkpoint.ModelSource, run_dir: Path) -> dict:
    summary = qm.cost(profile.mac_cost if profile.cost_table else None)
    return {
        "cgmq_version": __version__,
        "run": run_dir.name,
        "model": source.as_dict(),
        "profile": profile.name,
        "data": settings.data,
        "budget": settings.budget.as_dict(),
        "cost": summary.as_dict(),
        "feasible": settings.budget.is_satisfied_by(summary),
        "accuracy": {"float": float_acc, "quantized": quant_acc},
        "layers": [{"name": l.name, "op": l.op, "macs": l.macs, "params": l.params, "bits_w": l.bits_w,
                    "bits_a": l.bits_a, "bops": l.bops, "weight_bytes": l.weight_bytes} for l in summary.layers],
        "epochs": state.epoch,
        "seconds": seconds,
        "history": state.history,
    }


def _log_line(event: Event) -> str:
    fields = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.data.items()
                      if k not in ("repaired", "filled"))
    return f"{time.strftime('%H:%M:%S')} epoch={event.epoch + 1} {event.kind} {fields}"


def _start_run_dir(settings: CompressSettings, run_dir: Path, force: bool, ctx: DistContext, files: dict) -> None:
    """Rank 0 creates the run directory; every rank learns whether that worked."""
    error = None
    if ctx.is_main:
        try:
            rundir.prepare_run_dir(run_dir, force)
            rundir.write_json(run_dir / "config.json", files["config"])
            rundir.write_text(run_dir / "profile.yaml", files["profile"])
        except CgmqError as exc:
            error = exc
    if not ctx.all_true(error is None):
        raise error or UsageError(f"rank 0 could not prepare the run directory {run_dir}")


def compress(settings: CompressSettings, on_event: Callable[[Event], None] | None = None,
             force: bool = False, resume: bool = False) -> CompressResult:
    """Run (or resume) a compression; returns the run directory and its report.

    Under torchrun (WORLD_SIZE > 1) every rank trains on its shard of each
    global batch; only rank 0 writes the run directory and reports events.
    """
    ctx = distributed.from_env(settings.train.device)
    try:
        return _compress(settings, on_event, force, resume, ctx)
    finally:
        distributed.shutdown(ctx)


def _compress(settings: CompressSettings, on_event: Callable[[Event], None] | None, force: bool, resume: bool,
              ctx: DistContext) -> CompressResult:
    on_event = (on_event or (lambda e: None)) if ctx.is_main else (lambda e: None)
    device = distributed.device_for(ctx, settings.train.device)
    settings_run = replace(settings, train=replace(settings.train, device=device))
    run_dir = Path(settings.out)
    torch.manual_seed(settings.seed)
    model, qm, bundle, profile, source = _build(settings, run_dir if resume else None)
    notes = check_budget(qm, settings.budget, profile)
    if not resume:
        _start_run_dir(settings, run_dir, force, ctx, {
            "config": {"cgmq_version": __version__, "settings": settings.as_dict(), "source": source.as_dict(),
                       "sample_shape": list(bundle.sample_shape)},
            "profile": profile_yaml(profile)})
    log = rundir.RunLog(run_dir / "train.log") if ctx.is_main else None

    def emit(event: Event) -> None:
        if log is not None:
            log.write(_log_line(event))
        on_event(event)

    for note in notes:
        emit(Event("info", 0, {"message": note}))
    if ctx.enabled:
        emit(Event("info", 0, {"message": f"distributed: {ctx.world} processes, global batch {settings.batch_size}"}))
    loss_fn = _loss_fn(settings.loss)
    train_loader, val_loader = data.make_loaders(bundle, settings.batch_size, settings.workers, settings.seed,
                                                 distributed=ctx.enabled)
    float_acc = evaluate(model.to(device), val_loader, loss_fn, device, ctx)["accuracy"]
    qm.gm.to(device)
    trainer = Trainer(qm, train_loader, val_loader, settings.budget, settings_run.train,
                      profile.mac_cost if profile.cost_table else None, loss_fn, emit,
                      dist=ctx, amp=settings.amp)
    started = time.time()
    if resume:
        started -= _restore(run_dir, qm, trainer)
        emit(Event("info", trainer.state.epoch, {"message": f"resumed after epoch {trainer.state.epoch}"}))
    else:
        qm.calibrate(data.calibration_batch(bundle, 256, settings.seed).to(device))

    def save(state: TrainState) -> None:
        if ctx.is_main:
            _save_checkpoint(run_dir, qm, state, time.time() - started)

    if not resume:
        save(trainer.state)
    try:
        state = trainer.run(save)
    except KeyboardInterrupt:
        raise InterruptedRun(f"interrupted; {run_dir} keeps the state after epoch {trainer.state.epoch}",
                             f"continue with: cgmq compress --resume {run_dir}") from None
    except RuntimeError as exc:  # gloo/NCCL: a peer died or hung; every rank stops
        if not ctx.enabled or isinstance(exc, CgmqError):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TrainingError(f"rank {ctx.rank}: another process of this distributed run failed ({first[:160]}); "
                            f"the job stops, {run_dir} keeps the state after epoch {trainer.state.epoch}",
                            f"continue with: cgmq compress --resume {run_dir} (any number of processes)") from None
    finally:
        if log is not None:
            log.close()
    quant_acc = evaluate(qm.gm, val_loader, loss_fn, device, ctx)["accuracy"]
    report = _report(settings, qm, profile, float_acc, quant_acc, state, time.time() - started, source, run_dir)
    if ctx.is_main:
        save_model(run_dir / "model.pt", qm)
        rundir.write_json(run_dir / "report.json", report)
        rundir.point_latest(run_dir)
    ctx.barrier()
    return CompressResult(run_dir, report)


def _save_checkpoint(run_dir: Path, qm: QuantizedModel, state: TrainState, seconds: float) -> None:
    rundir.save_torch(run_dir / "checkpoint.pt", {
        "model": qm.gm.state_dict(), "epoch": state.epoch, "history": state.history,
        "optimizer": state.optimizer, "bad_batches": state.bad_batches, "seconds": seconds})


def _restore(run_dir: Path, qm: QuantizedModel, trainer: Trainer) -> float:
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        raise UsageError(f"{run_dir} has no checkpoint.pt to resume from")
    ckpt = torch.load(path, map_location=trainer.config.device, weights_only=True)
    qm.gm.load_state_dict(ckpt["model"])
    qm.gm.to(trainer.config.device)
    trainer.state = TrainState(epoch=ckpt["epoch"], history=list(ckpt["history"]), optimizer=ckpt["optimizer"],
                               bad_batches=ckpt["bad_batches"])
    if ckpt["optimizer"]:
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
    return float(ckpt.get("seconds", 0.0))


def save_model(path: Path, qm: QuantizedModel) -> None:
    """The compressed model: full state (folded weights, steps, gates) and the integer widths."""
    rundir.save_torch(path, {"format": MODEL_FORMAT, "state_dict": qm.gm.state_dict(), "widths": qm.widths(),
                             "bits": {k: list(v) for k, v in qm.bits().items()}})


def profile_yaml(profile: HardwareProfile) -> str:
    """The resolved profile as YAML (reloadable with parse_profile)."""
    import yaml

    from cgmq_cli.profiles import dump_profile

    return yaml.safe_dump(dump_profile(profile), sort_keys=False)


@dataclass(frozen=True)
class LoadedRun:
    run_dir: Path
    settings: CompressSettings
    qm: QuantizedModel
    profile: HardwareProfile
    report: dict


def load_run(run_dir: Path) -> LoadedRun:
    """Rebuild a finished run's quantized model (architecture from its recipe, state from model.pt)."""
    config = rundir.read_json(run_dir / "config.json")
    settings = CompressSettings.from_dict(config["settings"])
    report = rundir.read_json(run_dir / "report.json")
    if not (run_dir / "model.pt").is_file():
        raise UsageError(f"{run_dir} has no model.pt: the run did not finish", f"resume it: cgmq compress --resume {run_dir}")
    saved = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    profile = resolve_profile(settings, run_dir)
    source = config["source"]
    if source["kind"] in ("state_dict", "torchvision"):
        arch = source["arch"] or source["model"]
        user_state = {k: v for k, v in saved["state_dict"].items() if not k.startswith("cgmq.")}
        model = checkpoint.build_arch(arch, checkpoint.guess_num_classes(user_state) if arch.startswith(checkpoint.TORCHVISION) else None)
    else:
        path = Path(source["model"])
        if not path.is_file() or checkpoint.file_sha256(path) != source["sha256"]:
            raise UsageError(f"the run was made from {path}, which is missing or changed since",
                             "restore the original model file to rebuild this run")
        model, _ = checkpoint.load_model(str(path), None, source["trusted"])
    qm = api.prepare(model, tuple(config["sample_shape"]), settings.leaves, profile)
    qm.gm.load_state_dict(saved["state_dict"])
    qm.set_widths(dict(saved["widths"]))
    return LoadedRun(run_dir, settings, qm, profile, report)
