"""Pareto sweeps: one compress per budget, the float evaluation and the calibration computed once.

    settings, budget key, values -> check every budget -> shared start -> compress per value
        -> sweep.json (+ .md, .csv, .png: accuracy against cost with the Pareto front)

A sweep directory is a marked cgmq directory (``.cgmq-run``, locked while
written, replaced only with ``--force``) that holds one run directory per
point and ``sweep.json``::

    SWEEP/
      .cgmq-run  .cgmq-lock
      sweep.json  sweep.md  sweep.csv  sweep.png
      rel_bops-0.6/  rel_bops-1/  ...      ordinary run directories
      latest -> the last run

The target mode (:func:`run_target`) finds the smallest budget whose run loses
at most ``max_drop`` accuracy points by bisection on a log scale over
``[low, high]``: ``high`` first (if it misses, no budget in the interval is
expected to meet it), then ``low``, then geometric midpoints, at most
``max_runs`` runs, every one kept. Accuracy is not exactly monotone in the
budget, so the answer is the smallest *tested* budget that met the drop; each
point is within its own budget by construction (compress guarantees it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from cgmq_cli import __version__, atomic, rundir
from cgmq_cli.budget import BUDGET_KEYS, Budget
from cgmq_cli.errors import CgmqError, UsageError
from cgmq_cli.sanitize import short

if TYPE_CHECKING:
    from cgmq_cli.compress import CompressSettings
    from cgmq_cli.trainer import Event

FORMAT = "cgmq-sweep/1"
SWEEP_FILE = "sweep.json"
MAX_POINTS = 20
MAX_RUNS = 6  # the target mode's bound on compress runs


@dataclass(frozen=True)
class Shared:
    """What every compress of one model on one data set computes alike; a sweep computes it once.

    ``calibrated`` is the prepared model's state right after calibration
    (folded weights, MSE-initialised steps, initial gates); ``inputs`` the
    settings it is valid for (everything but the budget and the output).
    """

    float_accuracy: float
    calibrated: dict
    inputs: tuple


def shared_inputs(settings: "CompressSettings") -> tuple:
    return (settings.model, settings.arch, settings.data, settings.subset, settings.seed, settings.profile,
            settings.weight_bits, settings.act_bits, settings.leaves, settings.input_shape, settings.batch_size,
            settings.workers, settings.loss, settings.train.device)


def shared_start(settings: "CompressSettings", budgets: Sequence[Budget] = ()) -> Shared:
    """Evaluate the float model and calibrate once, as compress would; every budget and the augmentation are checked first."""
    import torch

    from cgmq_cli import augment, data, losses
    from cgmq_cli import compress as compress_mod
    from cgmq_cli.trainer import evaluate

    torch.manual_seed(settings.seed)
    model, qm, bundle, profile, _ = compress_mod._build(settings)
    augment.resolve(settings.augment, bundle.name, bundle.sample_shape, bundle.sample_dtype)  # as each run will
    for budget in budgets:
        compress_mod.check_budget(qm, budget, profile)
    device = settings.train.device
    _, val_loader = data.make_loaders(bundle, settings.batch_size, settings.workers, settings.seed)
    float_acc = evaluate(model.to(device), val_loader, losses.task_loss(settings.loss), device)["accuracy"]
    qm.gm.to(device)
    qm.calibrate(data.calibration_batch(bundle, 256, settings.seed).to(device))
    return Shared(float_acc, {k: v.detach().clone() for k, v in qm.gm.state_dict().items()}, shared_inputs(settings))


@dataclass(frozen=True)
class SweepResult:
    path: Path
    table: dict  # what sweep.json holds

    @property
    def chosen(self) -> float | None:
        """The target mode's answer: the smallest tested budget that met the drop (None: none did)."""
        return (self.table.get("target") or {}).get("chosen")


def parse_budgets(text: str, where: str = "--budgets") -> tuple[str, list[float]]:
    """``"rel_bops=0.6,1,2,4"`` -> ("rel_bops", [0.6, 1.0, 2.0, 4.0]) (sorted, without repeats)."""
    from cgmq_cli.settings import parse_number

    key, sep, values = (text or "").partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in BUDGET_KEYS or not values.strip():
        raise UsageError(f"{where} {short(text)}: expected KEY=V1,V2,... with KEY one of {', '.join(BUDGET_KEYS)}",
                         "e.g. --budgets rel_bops=0.6,1,2,4")
    numbers = sorted({parse_number(v.strip(), f"{where} {key}") for v in values.split(",") if v.strip()})
    if len(numbers) > MAX_POINTS:
        raise UsageError(f"{where}: {len(numbers)} values; a sweep has at most {MAX_POINTS} points")
    for value in numbers:
        Budget(**{key: value})  # the metric's own bounds (relative BOPs at most 100 %)
    return key, numbers


def point_name(key: str, value: float, taken: set[str]) -> str:
    name = base = f"{key}-{value:.4g}"
    i = 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _budget(settings: "CompressSettings", key: str, value: float) -> Budget:
    return Budget(**{**settings.budget.limits(), key: value})


def pareto(points: Sequence[dict], key: str) -> list[bool]:
    """Whether each point is on the Pareto front of (cost ``key``: lower is better, accuracy: higher is better)."""
    out = []
    for p in points:
        c, a = p["cost"][key], p["accuracy"]["quantized"]
        out.append(not any((q["cost"][key] <= c and q["accuracy"]["quantized"] >= a)
                           and (q["cost"][key] < c or q["accuracy"]["quantized"] > a) for q in points))
    return out


def _point(name: str, key: str, value: float, report: dict, max_drop: float | None) -> dict:
    acc = report["accuracy"]
    drop = acc["float"] - acc["quantized"]
    return {"run": name, "value": value, "budget": report["budget"], "cost": report["cost"], "accuracy": acc,
            "drop": drop, "feasible": report["feasible"], "seconds": report["seconds"],
            "meets_drop": None if max_drop is None else drop <= max_drop}


class _Sweep:
    """One sweep directory being written: its lock, its points and its files."""

    def __init__(self, settings: "CompressSettings", key: str, out: Path, force: bool, mode: str,
                 on_event: "Callable[[Event], None] | None", notify: Callable[[str], None] | None,
                 target: dict | None = None) -> None:
        from cgmq_cli import compress as compress_mod

        if key not in BUDGET_KEYS:
            raise UsageError(f"unknown budget key {short(key)}", f"budget keys: {', '.join(BUDGET_KEYS)}")
        self.settings, self.key, self.out, self.force, self.mode = settings, key, Path(out), force, mode
        self.on_event, self.notify = on_event, notify or (lambda _m: None)
        self.target = target
        self.inputs = compress_mod.input_paths(settings)
        self.points: list[dict] = []
        self.taken: set[str] = set()
        self.started = time.time()
        self.shared: Any = None
        self.run: rundir.RunDir | None = None

    def start(self, values: Sequence[float]) -> None:
        """Check everything (output, model, data, every budget), compute the shared start, then create the directory."""
        rundir.check_new_run(self.out, self.force, self.inputs)
        self.notify(f"sweep: checking {len(values)} budgets, evaluating the float model and calibrating once")
        self.shared = shared_start(self.settings, tuple(_budget(self.settings, self.key, v) for v in values))
        self.run = rundir.prepare(self.out, self.force, self.inputs)
        self.write()

    def compress(self, value: float, index: int | None = None, total: int | None = None) -> dict:
        from cgmq_cli import compress as compress_mod

        name = point_name(self.key, value, self.taken)
        where = f"{index}/{total}" if index is not None else f"run {len(self.points) + 1}"
        self.notify(f"sweep {where}: {self.key}={value:g} -> {self.out / name}")
        child = replace(self.settings, budget=_budget(self.settings, self.key, value), out=str(self.out / name))
        result = compress_mod.compress(child, self.on_event, shared=self.shared)
        point = _point(name, self.key, value, result.report, (self.target or {}).get("max_accuracy_drop"))
        self.points.append(point)
        self.notify(f"sweep {where}: {self.key}={value:g}: accuracy {point['accuracy']['quantized']:.2f}% "
                    f"(drop {point['drop']:+.2f}), {self.key} {point['cost'][self.key]:,.6g}, within budget: "
                    f"{'yes' if point['feasible'] else 'NO'}")
        self.write()
        return point

    def table(self, complete: bool) -> dict:
        s = self.settings
        ordered = sorted(self.points, key=lambda p: p["value"])
        front = pareto(ordered, self.key)
        return {
            "format": FORMAT, "cgmq_version": __version__, "sweep": self.out.name, "mode": self.mode, "key": self.key,
            "model": s.arch or s.model, "data": s.data, "profile": s.profile or "generic",
            "fixed_budget": {k: v for k, v in s.budget.limits().items() if k != self.key},
            "float_accuracy": getattr(self.shared, "float_accuracy", None),
            "target": self.target, "complete": complete, "seconds": time.time() - self.started,
            "runs": len(self.points),
            "points": [{**p, "pareto": on} for p, on in zip(ordered, front)],
        }

    def write(self, complete: bool = False) -> dict:
        table = self.table(complete)
        atomic.write_json(self.out / SWEEP_FILE, table)
        return table

    def finish(self) -> SweepResult:
        from cgmq_cli import report as rep

        table = self.write(complete=True)
        atomic.write_text(self.out / "sweep.md", rep.sweep_markdown(table))
        atomic.write_text(self.out / "sweep.csv", rep.sweep_csv(table))
        try:
            rep.sweep_plot(table, self.out / "sweep.png")
        except UsageError as exc:  # matplotlib missing: the tables are written, the plot is not
            self.notify(f"note: sweep.png not written: {exc.message}; {exc.hint}")
        if self.run is not None:
            self.run.finished()  # a sweep this one replaced (--force) was kept until now
        return SweepResult(self.out, table)

    def has_runs(self) -> bool:
        """Whether any point left a run directory (finished, or kept to resume)."""
        return any(p.is_dir() and not p.is_symlink() and p.name != rundir.HELD for p in self.out.iterdir())

    def close(self) -> None:
        if self.run is not None:
            self.run.release()


def _guarded(sweep: _Sweep, body: Callable[[], SweepResult]) -> SweepResult:
    """Run ``body``; on failure the points done so far stay recorded in sweep.json (``complete: false``), and
    a sweep with none is undone."""
    try:
        return body()
    except BaseException:
        if sweep.run is not None and sweep.points:
            try:
                sweep.write(complete=False)
            except CgmqError:
                pass
        elif sweep.run is not None and not sweep.has_runs():
            sweep.run.discard()  # nothing was run: no empty sweep is left, and a replaced one (--force) comes back
            sweep.run = None
        raise
    finally:
        sweep.close()


def run_sweep(settings: "CompressSettings", key: str, values: list[float], out: Path,
              on_event: "Callable[[Event], None] | None" = None, notify: Callable[[str], None] | None = None,
              force: bool = False) -> SweepResult:
    """One compress per value of budget ``key``; see the module docstring."""
    values = sorted({float(v) for v in values})
    if not values or len(values) > MAX_POINTS:
        raise UsageError(f"a sweep needs 1 to {MAX_POINTS} budget values, got {len(values)}")
    sweep = _Sweep(settings, key, out, force, "grid", on_event, notify)

    def body() -> SweepResult:
        sweep.start(values)
        for i, value in enumerate(values, 1):
            sweep.compress(value, i, len(values))
        return sweep.finish()

    return _guarded(sweep, body)


def run_target(settings: "CompressSettings", key: str, low: float, high: float, max_drop: float, out: Path,
               max_runs: int = MAX_RUNS, on_event: "Callable[[Event], None] | None" = None,
               notify: Callable[[str], None] | None = None, force: bool = False) -> SweepResult:
    """The smallest tested budget in [low, high] whose accuracy drop is at most ``max_drop``; see the module docstring."""
    if not 0 < low < high:
        raise UsageError(f"--max-accuracy-drop searches between two budgets; got {key}={low:g},{high:g}",
                         f"give the interval, e.g. --budgets {key}=0.5,8")
    if not 2 <= max_runs <= MAX_RUNS:
        raise UsageError(f"--max-runs {max_runs}: must be from 2 to {MAX_RUNS}")
    if not (math.isfinite(max_drop) and 0 <= max_drop <= 100):
        raise UsageError(f"--max-accuracy-drop {max_drop:g}: must be a percentage from 0 to 100")
    target = {"max_accuracy_drop": max_drop, "low": low, "high": high, "max_runs": max_runs, "chosen": None,
              "chosen_run": None}
    sweep = _Sweep(settings, key, out, force, "target", on_event, notify, target)

    def choose(point: dict) -> None:
        if point["meets_drop"] and (target["chosen"] is None or point["value"] < target["chosen"]):
            target["chosen"], target["chosen_run"] = point["value"], point["run"]

    def body() -> SweepResult:
        sweep.start([low, high])
        top = sweep.compress(high)
        choose(top)
        if top["meets_drop"]:
            bottom = sweep.compress(low)
            choose(bottom)
            failing, passing = (None, low) if bottom["meets_drop"] else (low, high)
            while failing is not None and len(sweep.points) < max_runs:
                mid = math.sqrt(failing * passing)
                point = sweep.compress(float(f"{mid:.4g}"))
                choose(point)
                if point["meets_drop"]:
                    passing = point["value"]
                else:
                    failing = point["value"]
        return sweep.finish()

    return _guarded(sweep, body)


def changed_points(path: Path, table: dict) -> list[str]:
    """The points whose run directory no longer holds the run the table records (replaced, removed or damaged)."""
    from cgmq_cli import run_files

    changed = []
    for point in table["points"]:
        try:
            report = run_files.read_report(Path(path) / point["run"])
        except CgmqError:
            changed.append(point["run"])
            continue
        if report["accuracy"] != point["accuracy"] or report["cost"].get(table["key"]) != point["cost"][table["key"]]:
            changed.append(point["run"])
    return changed


def is_sweep(path: Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def read_sweep(path: Path) -> dict:
    """sweep.json with the fields the renderers read present and well typed."""
    file = Path(path) / SWEEP_FILE
    table = atomic.read_json(file)
    bad = UsageError(f"{file} is not a cgmq sweep table; the sweep directory was damaged or edited", "sweep again")
    if not isinstance(table, dict) or table.get("format") != FORMAT or not isinstance(table.get("points"), list) \
            or table.get("key") not in BUDGET_KEYS:
        raise bad
    for p in table["points"]:
        if not isinstance(p, dict) or not isinstance(p.get("run"), str) or not isinstance(p.get("cost"), dict) \
                or not isinstance(p.get("accuracy"), dict) or not isinstance(p.get("value"), (int, float)) \
                or not isinstance(p["cost"].get(table["key"]), (int, float)) \
                or not all(isinstance(p["accuracy"].get(k), (int, float)) for k in ("float", "quantized")):
            raise bad
    return table
