"""Accuracy at equal budget: CGMQ against uniform QAT, sensitivity-guided MP, a penalty method and ORT int8.

    python benchmarks/suite.py --task fashion-mnist      # Bayesian Bits LeNet-5 on all of Fashion-MNIST
    python benchmarks/suite.py --task digits             # quick variant (a few minutes)

Writes benchmarks/results/<name>.json, <name>.md and <name>.png. Every finished run is cached in
benchmarks/results/<name>-runs/ (an interrupted suite resumes; delete the folder to start again).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402

from cgmq_cli import compress as cmp  # noqa: E402
from cgmq_cli import augment, data, models, qmodel  # noqa: E402
from cgmq_cli.cost import Budget  # noqa: E402
from cgmq_cli.errors import DataError  # noqa: E402
from cgmq_cli.export import onnx_qdq, verify  # noqa: E402
from cgmq_cli.trainer import Trainer, TrainConfig, evaluate, train_float  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = {
    "fashion-mnist": dict(model=models.LeNet5, arch="cgmq_cli.models:LeNet5", float_epochs=8, float_lr=1e-3, batch=128),
    "digits": dict(model=models.DigitsCNN, arch="cgmq_cli.models:DigitsCNN", float_epochs=15, float_lr=3e-3, batch=32),
}
CE = nn.functional.cross_entropy
# LSQ QAT of the fixed-width alternatives and the penalty method: Adam 1e-4, constant (the protocol).
QAT = dict(lr=1e-4, lr_schedule="constant", gate_weights=False, recalibrate=False)


def float_checkpoint(task: str, bundle: data.DataBundle, cfg: dict) -> nn.Module:
    path = RESULTS / f"{task}-float-seed0.pt"
    # seed 0 initialises the model too (the "seed 0"); before stop 22 it set only the data order, and the
    # weights came from torch's default generator (fashion-mnist-float-default-init.pt, 90.78 %)
    torch.manual_seed(0)
    model = cfg["model"]()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    loader, _ = data.make_loaders(bundle, cfg["batch"], 0, 0)
    train_float(model, loader, cfg["float_epochs"], cfg["float_lr"], seed=0)
    torch.save(model.state_dict(), path)
    return model.eval()


def prepared(model: nn.Module, bundle: data.DataBundle) -> qmodel.QuantizedModel:
    qm = qmodel.prepare(copy.deepcopy(model), bundle.sample_shape)
    qm.calibrate(data.calibration_batch(bundle, 256, 0))
    return qm


def train_and_score(qm, trainer_cls, loaders, budget, config, **attrs) -> dict:
    trainer = trainer_cls(qm, loaders[0], loaders[1], budget, config)
    for key, value in attrs.items():
        setattr(trainer, key, value)
    torch.manual_seed(config.seed if hasattr(config, "seed") else 0)
    start = time.time()
    state = trainer.run()
    seconds = time.time() - start
    cost = qm.cost()
    acc = evaluate(qm.gm, loaders[1], CE, "cpu")["accuracy"]
    return {"rel_bops": cost.rel_bops, "within_budget": budget.is_satisfied_by(cost), "accuracy": acc,
            "seconds": seconds, "epoch_accuracy": [h["accuracy"] for h in state.history],
            "bits": {k: list(v) for k, v in qm.bits().items()}}


def run_cgmq(ctx, budget, seed, **recipe) -> dict:
    """``cgmq compress`` as a user runs it: every default (but ``recipe``), the task's batch size and the same checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = cmp.CompressSettings(model=str(ctx["ckpt"]), arch=ctx["arch"], data=ctx["data"], subset=ctx["subset"],
                                        out=f"{tmp}/run", budget=budget, batch_size=ctx["batch"], seed=seed,
                                        augment=ctx["augment_choice"],
                                        train=TrainConfig(epochs=ctx["epochs"], **recipe))
        start = time.time()
        report = cmp.compress(settings).report
        wall = time.time() - start
    hist = report["history"]
    finish = sum(h.get("finish_seconds", 0.0) for h in hist)
    return {"rel_bops": report["cost"]["rel_bops"], "within_budget": report["feasible"],
            "accuracy": report["accuracy"]["quantized"], "seconds": wall, "finish_seconds": finish,
            "finish_share": finish / wall, "epoch_accuracy": [h["accuracy"] for h in hist],
            "epoch_kinds": [h["epoch_kind"] for h in hist], "runs": 1,
            "bits": {l["name"]: [l["bits_w"], l["bits_a"]] for l in report["layers"]}}


def _fixed(ctx, budget, seed, pick, recipe: dict) -> dict:
    """LSQ QAT at fixed widths chosen by ``pick(qm)`` (None: nothing fits); timed from preparing to the last epoch."""
    start = time.time()
    torch.manual_seed(seed)
    qm = prepared(ctx["model"], ctx["bundle"])
    bits = pick(qm)
    if bits is None:
        return {"rel_bops": None, "within_budget": False, "accuracy": None, "seconds": 0.0, "runs": 0,
                "note": "no uniform width pair fits"}
    qm.set_widths(bits)
    result = train_and_score(qm, Trainer, ctx["loaders"], budget, TrainConfig(epochs=ctx["epochs"], rounds=0, **recipe))
    return {**result, "seconds": time.time() - start, "runs": 1}


def run_cgmq_exchange(ctx, budget, seed) -> dict:
    """cgmq with the finish's measured exchange search on (``measured_exchange``)."""
    return run_cgmq(ctx, budget, seed, measured_exchange=True)


def run_uniform(ctx, budget, seed, recipe=QAT) -> dict:
    return _fixed(ctx, budget, seed, lambda qm: baselines.uniform_bits(qm, budget), recipe)


def run_uniform4(ctx, budget, seed, recipe=QAT) -> dict:
    """Every weight and activation at 4 bits (what a user of a fixed-width QAT tool would pick), if it fits."""
    def pick(qm):
        bits = baselines.uniform_widths(qm, 4, 4)
        qm.set_widths(bits)
        return bits if budget.is_satisfied_by(qm.cost()) else None
    return _fixed(ctx, budget, seed, pick, recipe)


def run_uniform4_recipe(ctx, budget, seed) -> dict:
    return run_uniform4(ctx, budget, seed, {})


def run_float_recipe(ctx, budget, seed) -> dict:
    """A reference, not a method: the float model fine-tuned with cgmq's recipe for the same epochs (every
    width 32, i.e. no quantization), so what training alone gives; never within a budget below 100 %."""
    return _fixed(ctx, budget, seed, lambda qm: baselines.uniform_widths(qm, 32, 32), {})


def _with_bits(bits: dict):
    """A ``pick`` for :func:`_fixed` that sets per-layer (weight, input) widths."""
    def pick(qm):
        qm.set_bits({layer: tuple(wa) for layer, wa in bits.items()})
        return qm.widths()
    return pick


def run_cgmq_widths_recipe(ctx, budget, seed) -> dict:
    """A diagnostic, not a method: cgmq's recipe for every epoch (no gate epoch) on the widths cgmq's own run of
    this budget and seed ended with (its cached result), so what the gate epoch's pass and the search cost."""
    path = ctx["runs_dir"] / f"cgmq__{budget.rel_bops:g}__s{seed}.json"
    if not path.exists():
        sys.exit(f"error: {path.name} is not in {path.parent}; run --methods cgmq at this budget and seed first")
    return _fixed(ctx, budget, seed, _with_bits(json.loads(path.read_text())["bits"]), {})


def run_layout_recipe(ctx, budget, seed, layout: dict) -> dict:
    """A diagnostic: cgmq's recipe for every epoch on the per-layer widths ``layout`` (from ``--layout``)."""
    return _fixed(ctx, budget, seed, _with_bits(layout), {})


def run_sensitivity(ctx, budget, seed, recipe=QAT) -> dict:
    batches = [b for b, _ in zip(ctx["loaders"][0], range(8))]
    return _fixed(ctx, budget, seed, lambda qm: baselines.sensitivity_bits(qm, budget, batches), recipe)


def run_uniform_recipe(ctx, budget, seed) -> dict:
    """The same, with cgmq's default weight-training recipe (lr and schedule) instead of Adam 1e-4."""
    return run_uniform(ctx, budget, seed, {})


def run_sensitivity_recipe(ctx, budget, seed) -> dict:
    return run_sensitivity(ctx, budget, seed, {})


def run_penalty(ctx, budget, seed, max_tries=6) -> dict:
    """How a user tunes a penalty method: raise mu by 100x until a run lands within budget, then bisect
    log10(mu) between the largest miss and the smallest hit (``max_tries`` runs in all), keeping the
    within-budget run that uses most of the budget. Returns it with the number of runs needed.

    A penalty run does not depend on the budget (nothing enforces it), so runs are cached by mu and
    shared between the budgets' searches; ``runs`` counts the runs one budget's search needs."""
    tried, hits = [], []
    miss = hit = None  # log10 mu of the largest miss / smallest hit so far
    mu = -2.0
    while len(tried) < max_tries:
        def one(mu=mu):
            torch.manual_seed(seed)
            start = time.time()
            result = train_and_score(prepared(ctx["model"], ctx["bundle"]), baselines.PenaltyTrainer, ctx["loaders"],
                                     budget, TrainConfig(epochs=ctx["epochs"], **QAT), mu=10.0 ** mu)
            return {**result, "seconds": time.time() - start}

        result = ctx["cache"](f"penalty__mu{mu:+.4f}__s{seed}", one)
        result = {**result, "within_budget": result["rel_bops"] <= budget.rel_bops}
        tried.append({"mu": 10.0 ** mu, "rel_bops": result["rel_bops"], "accuracy": result["accuracy"]})
        if result["within_budget"]:
            hits.append({**result, "mu": 10.0 ** mu})
            hit = mu if hit is None else min(hit, mu)
        else:
            miss = mu if miss is None else max(miss, mu)
        if hit is None:
            mu += 2.0
        elif miss is None or hit - miss < 0.25:
            break
        else:
            mu = (miss + hit) / 2
    if not hits:
        return {**result, "runs": len(tried), "mu": 10.0 ** mu, "tried": tried,
                "note": f"not within budget after {len(tried)} runs"}
    best = max(hits, key=lambda h: h["rel_bops"])
    return {**best, "runs": len(tried), "tried": tried}


def run_ort_int8(model, bundle, loaders) -> dict:  # noqa: D103
    qm = prepared(model, bundle)
    with tempfile.TemporaryDirectory() as tmp:
        f, q = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        onnx_qdq.export_float(qm, f, opset=17)
        calib = [x for x, _ in zip(iter(data.calibration_batch(bundle, 256, 0).split(32)), range(8))]
        baselines.onnxruntime_int8(str(f), str(q), calib)
        read = verify.read_widths(q)
        session = verify.load_session(q)
        name = session.get_inputs()[0].name
        correct = total = 0
        for x, y in loaders[1]:
            out = session.run(None, {name: x.numpy()})[0]
            correct += int((torch.from_numpy(out).argmax(1) == y).sum())
            total += len(y)
    rel = 100.0 * read.bops / (read.macs * 1024)
    return {"rel_bops": rel, "accuracy": 100.0 * correct / total, "seconds": 0.0, "runs": 1}


def method_cost(model, bundle, loaders) -> dict:
    """Time per training step, quantized vs float (same run), and ORT latency QDQ vs float."""
    qm = prepared(model, bundle)
    qm.set_widths(baselines.uniform_widths(qm, 4, 4))
    batches = [b for b, _ in zip(loaders[0], range(20))]

    def step_time(net: nn.Module) -> float:
        opt = torch.optim.Adam(net.parameters(), 1e-4)
        net.train()
        times = []
        for x, y in batches:
            t = time.perf_counter()
            opt.zero_grad()
            CE(net(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t)
        return statistics.median(times[5:])

    float_net = copy.deepcopy(model)
    ratios = [step_time(qm.gm) / step_time(float_net) for _ in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_qdq.export_qdq(qm, Path(tmp) / "q.onnx", check=False)
        onnx_qdq.export_float(qm, Path(tmp) / "f.onnx")
        example = torch.zeros((1, *bundle.sample_shape))
        lq, lf = verify.latency(Path(tmp) / "q.onnx", example, 200), verify.latency(Path(tmp) / "f.onnx", example, 200)
    return {"train_step_ratio_quant_over_float": statistics.median(ratios),
            "ort_latency_ms": {"qdq_all_4bit": lq, "float": lf, "ratio": lq / lf}}


def summarize(rows: list[dict]) -> list[dict]:
    out = {}
    for r in rows:
        out.setdefault((r["method"], r["budget"]), []).append(r)
    table = []
    for (method, budget), rs in out.items():
        accs = [r["accuracy"] for r in rs if r["accuracy"] is not None]
        table.append({"method": method, "budget": budget,
                      "rel_bops": statistics.mean(r["rel_bops"] for r in rs if r["rel_bops"] is not None) if accs else None,
                      "within_budget": all(r.get("within_budget", True) for r in rs),
                      "accuracy_mean": statistics.mean(accs) if accs else None,
                      "accuracy_spread": (max(accs) - min(accs)) if len(accs) > 1 else 0.0,
                      "seeds": len(rs), "seconds": statistics.mean(r["seconds"] for r in rs),
                      "runs_needed": max(r["runs"] for r in rs)})
    return table


def markdown(name: str, meta: dict, table: list[dict], rows: list[dict]) -> str:
    lines = [f"# {name}", "", f"Float checkpoint: {meta['float_accuracy']:.2f} % test accuracy ({meta['float_recipe']}). "
             f"{meta['epochs']} epochs per method from it, seeds {meta['seeds']}, train examples {meta['train_examples']}, "
             f"torch threads {meta['threads']}, training-data augmentation of every method "
             f"{meta.get('augment', 'none')}, command `{meta['command']}`.", "",
             "| budget (rel. BOPs %) | method | achieved rel. BOPs % | within budget | accuracy % (mean, spread) | "
             "wall s | runs needed |", "|---:|---|---:|---|---:|---:|---:|"]
    for r in sorted(table, key=lambda r: (r["budget"] if r["budget"] is not None else 99, r["method"])):
        acc = "n/a" if r["accuracy_mean"] is None else f"{r['accuracy_mean']:.2f} ± {r['accuracy_spread'] / 2:.2f}"
        rel = "n/a" if r["rel_bops"] is None else f"{r['rel_bops']:.3f}"
        budget = "-" if r["budget"] is None else f"{r['budget']:g}"
        lines.append(f"| {budget} | {r['method']} | {rel} | {'yes' if r['within_budget'] else 'NO'} | {acc} | "
                     f"{r['seconds']:.0f} | {r['runs_needed']} |")
    cg = [r for r in rows if r["method"] == "cgmq"]
    if cg:
        lines += ["", "cgmq per run: accuracy after each epoch (g = gate, w = weight), compress wall time, the finish's "
                  "share of it, and the ratio to the uniform QAT run of the same budget and seed (run next to it in "
                  "the same process):", "",
                  "| budget | seed | accuracy after each epoch | compress s | finish s (share) | / uniform QAT |",
                  "|---:|---:|---|---:|---:|---:|"]
        uni = {(r["budget"], r["seed"]): r for r in rows if r["method"] == "uniform"}
        for r in cg:
            kinds = "".join(k[0] for k in r["epoch_kinds"])
            u = uni.get((r["budget"], r["seed"]))
            ratio = f"{r['seconds'] / u['seconds']:.2f}x" if u and u.get("seconds") else "n/a"
            lines.append(f"| {r['budget']:g} | {r['seed']} | {kinds}: {', '.join(f'{a:.2f}' for a in r['epoch_accuracy'])} | "
                         f"{r['seconds']:.0f} | {r['finish_seconds']:.1f} ({100 * r['finish_share']:.1f} %) | {ratio} |")
    mc = meta.get("method_cost")
    if mc:
        lines += ["", f"Training step, quantized (all 4-bit) / float, same run: {mc['train_step_ratio_quant_over_float']:.2f}x. "
                  f"onnxruntime latency (batch 1, median of 200): QDQ {mc['ort_latency_ms']['qdq_all_4bit']:.3f} ms vs float "
                  f"{mc['ort_latency_ms']['float']:.3f} ms ({mc['ort_latency_ms']['ratio']:.2f}x)."]
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path, float_acc: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - formatters below

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({r["method"] for r in table}):
        pts = sorted((r["rel_bops"], r["accuracy_mean"]) for r in table if r["method"] == method and r["accuracy_mean"] is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    for b in sorted({r["budget"] for r in table if r["budget"] is not None}):
        ax.axvline(b, color="grey", lw=0.5, ls=":")
    ax.axhline(float_acc, color="black", lw=0.8, ls="--", label="float")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("relative BOPs (%) — dotted lines: budgets")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="fashion-mnist")
    parser.add_argument("--data", help="data spec (default: the task name, e.g. the Debian fashion-mnist files)")
    parser.add_argument("--budgets", default="0.6,1.0,1.73,3.0")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--subset", type=int, default=None, help="train on a fixed subset of N examples")
    parser.add_argument("--methods", default="cgmq,uniform,sensitivity,penalty,ort-int8")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core machine)")
    parser.add_argument("--no-method-cost", action="store_true", help="skip the step-time / latency measurement")
    parser.add_argument("--name", default=None)
    parser.add_argument("--layout", action="append", default=[], metavar="NAME=JSON",
                        help="widths for method layout-recipe (repeat for several), e.g. "
                             "'w2={\"features.0\": [2, 8], \"features.3\": [4, 4]}' (layer -> [weight bits, "
                             "input bits]; layers not named keep their widest widths); cached as layout-NAME")
    parser.add_argument("--augment", default="none", choices=augment.CHOICES,
                        help="cgmq's --augment; every other method trains on the same augmented loaders (the float "
                             "checkpoint never: it keeps the issue's recipe)")
    parser.add_argument("--cached-only", action="store_true",
                        help="write the tables from the runs already cached under <name>-runs; run nothing new")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TASKS[args.task]
    spec = args.data or args.task
    try:
        bundle = data.load_data(spec, args.subset, 0)
    except DataError as exc:
        sys.exit(f"error: {exc.message}\nhint: {exc.hint or ''} (Debian: apt-get update && apt-get install -y dataset-fashion-mnist)")
    full = data.load_data(spec, None, 0)
    model = float_checkpoint(args.task, full, cfg)
    loaders = data.make_loaders(bundle, cfg["batch"], 0, 0)
    float_acc = evaluate(model, loaders[1], CE, "cpu")["accuracy"]
    print(f"float accuracy {float_acc:.2f}%", flush=True)
    name = args.name or f"{args.task}" + (f"-subset{args.subset}" if args.subset else "")
    runs_dir = RESULTS / f"{name}-runs"
    runs_dir.mkdir(parents=True, exist_ok=True)

    augmentation = augment.resolve(args.augment, bundle.name, bundle.sample_shape, bundle.sample_dtype)

    def cache(key: str, fn):
        path = runs_dir / f"{key}.json"
        if path.exists():
            result = json.loads(path.read_text())
            if result.get("augment", "none") != (augmentation or "none"):
                sys.exit(f"error: {path} was trained with --augment {result.get('augment', 'none')}, not "
                         f"{args.augment}; pass another --name")
            return result
        result = {**fn(), "augment": augmentation or "none"}
        path.write_text(json.dumps(result, indent=1) + "\n")
        return result

    methods = args.methods.split(",")
    rows = []
    runners = {"cgmq": run_cgmq, "cgmq-exchange": run_cgmq_exchange, "uniform": run_uniform,
               "sensitivity": run_sensitivity, "penalty": run_penalty,
               "uniform-recipe": run_uniform_recipe, "sensitivity-recipe": run_sensitivity_recipe,
               "uniform4": run_uniform4, "uniform4-recipe": run_uniform4_recipe,
               "float-recipe": run_float_recipe, "cgmq-widths-recipe": run_cgmq_widths_recipe}
    layouts = []  # each --layout NAME=JSON is a method of its own, layout-NAME
    for spec_ in args.layout:
        name_, _, text = spec_.partition("=")
        try:
            runners[f"layout-{name_}"] = functools.partial(run_layout_recipe, layout=dict(json.loads(text)))
        except (ValueError, TypeError) as exc:
            sys.exit(f"error: --layout {spec_!r} is not NAME=JSON of layer -> [weight bits, input bits] ({exc})")
        layouts.append(f"layout-{name_}")
    if "layout-recipe" in methods:
        if not layouts:
            sys.exit("error: --methods layout-recipe needs at least one --layout NAME=JSON")
        methods = [m for m in methods if m != "layout-recipe"] + layouts
    for budget_pct in [float(b) for b in args.budgets.split(",")]:
        for seed in range(args.seeds):
            # the seed sets the data order (and which images the augmentation flips)
            seed_loaders = data.make_loaders(bundle, cfg["batch"], 0, seed, augment=augmentation)
            ctx = {"model": model, "bundle": bundle, "loaders": seed_loaders, "epochs": args.epochs, "cache": cache,
                   "augment_choice": args.augment,
                   "ckpt": RESULTS / f"{args.task}-float-seed0.pt", "arch": cfg["arch"], "data": spec,
                   "subset": args.subset, "batch": cfg["batch"], "runs_dir": runs_dir}
            for method in [m for m in methods if m in runners]:
                budget = Budget(rel_bops=budget_pct)
                run = lambda: runners[method](ctx, budget, seed)  # noqa: E731
                key = f"{method}__{budget_pct:g}__s{seed}"
                if args.cached_only and not (runs_dir / f"{key}.json").exists():
                    continue
                result = run() if method == "penalty" else cache(key, run)
                rows.append({"method": method, "budget": budget_pct, "seed": seed, **result})
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("bits", "tried")}), flush=True)
    if "ort-int8" in methods:
        rows.append({"method": "onnxruntime int8 PTQ", "budget": None, "seed": 0,
                     **cache("ort-int8", lambda: run_ort_int8(model, bundle, loaders))})
        print(json.dumps(rows[-1]), flush=True)
    recipe = f"{cfg['float_epochs']} epochs of Adam {cfg['float_lr']:g}, batch {cfg['batch']}, seed 0"
    meta = {"task": args.task, "float_accuracy": float_acc, "float_recipe": recipe, "epochs": args.epochs,
            "augment": augmentation or "none",
            "seeds": args.seeds, "threads": args.threads, "train_examples": len(bundle.train),
            "command": shlex.join(["python", "benchmarks/suite.py", *sys.argv[1:]]), "torch": torch.__version__,
            "method_cost": None if args.no_method_cost else cache("method-cost", lambda: method_cost(model, bundle, loaders))}
    table = summarize(rows)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "summary": table, "runs": rows}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(name, meta, table, rows))
    try:
        plot(table, RESULTS / f"{name}.png", float_acc)
    except ImportError:  # the tables above are the results; the figure needs the plot extra
        print("no figure: pip install -e '.[plot]' for matplotlib", file=sys.stderr)
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
