"""Accuracy at equal budget: CGMQ against uniform QAT, sensitivity-guided MP, a penalty method and ORT int8.

    python benchmarks/suite.py --task fashion-mnist      # Bayesian Bits LeNet-5 on Fashion-MNIST
    python benchmarks/suite.py --task digits             # quick variant (a few minutes)

Writes benchmarks/results/<name>.json, <name>.md and <name>.png. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402

from cgmq_cli import data, models, qmodel  # noqa: E402
from cgmq_cli.cost import Budget  # noqa: E402
from cgmq_cli.errors import DataError  # noqa: E402
from cgmq_cli.export import onnx_qdq, verify  # noqa: E402
from cgmq_cli.trainer import Trainer, TrainConfig, evaluate, train_float  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = {
    "fashion-mnist": dict(model=models.LeNet5, float_epochs=5, float_lr=1e-3, batch=128),
    "digits": dict(model=models.DigitsCNN, float_epochs=15, float_lr=3e-3, batch=32),
}
CE = nn.functional.cross_entropy


def float_checkpoint(task: str, bundle: data.DataBundle, cfg: dict) -> nn.Module:
    path = RESULTS / f"{task}-float-seed0.pt"
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
    trainer.run()
    seconds = time.time() - start
    cost = qm.cost()
    acc = evaluate(qm.gm, loaders[1], CE, "cpu")["accuracy"]
    return {"rel_bops": cost.rel_bops, "within_budget": budget.is_satisfied_by(cost), "accuracy": acc,
            "seconds": seconds, "bits": {k: list(v) for k, v in qm.bits().items()}}


def run_cgmq(model, bundle, loaders, budget, epochs, seed) -> dict:
    torch.manual_seed(seed)
    return {**train_and_score(prepared(model, bundle), Trainer, loaders, budget, TrainConfig(epochs=epochs)), "runs": 1}


def run_uniform(model, bundle, loaders, budget, epochs, seed) -> dict:
    torch.manual_seed(seed)
    qm = prepared(model, bundle)
    bits = baselines.uniform_bits(qm, budget)
    if bits is None:
        return {"rel_bops": None, "within_budget": False, "accuracy": None, "seconds": 0.0, "runs": 0,
                "note": "no uniform width pair fits"}
    qm.set_widths(bits)
    return {**train_and_score(qm, Trainer, loaders, budget, TrainConfig(epochs=epochs, rounds=0)), "runs": 1}


def run_sensitivity(model, bundle, loaders, budget, epochs, seed) -> dict:
    torch.manual_seed(seed)
    qm = prepared(model, bundle)
    batches = [b for b, _ in zip(loaders[0], range(8))]
    start = time.time()
    baselines.sensitivity_bits(qm, budget, batches)
    search = time.time() - start
    result = train_and_score(qm, Trainer, loaders, budget, TrainConfig(epochs=epochs, rounds=0))
    return {**result, "seconds": result["seconds"] + search, "runs": 1}


def run_penalty(model, bundle, loaders, budget, epochs, seed, max_tries=6) -> dict:
    """How a user tunes a penalty method: raise mu by 100x until a run lands within budget, then bisect
    log10(mu) between the largest miss and the smallest hit (``max_tries`` runs in all), keeping the
    within-budget run that uses most of the budget. Returns it with the number of runs needed."""
    tried, hits = [], []
    miss = hit = None  # log10 mu of the largest miss / smallest hit so far
    mu = -2.0
    while len(tried) < max_tries:
        torch.manual_seed(seed)
        result = train_and_score(prepared(model, bundle), baselines.PenaltyTrainer, loaders, budget,
                                 TrainConfig(epochs=epochs), mu=10.0 ** mu)
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


def run_ort_int8(model, bundle, loaders) -> dict:
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


def markdown(name: str, meta: dict, table: list[dict]) -> str:
    lines = [f"# {name}", "", f"float accuracy {meta['float_accuracy']:.2f} %, {meta['epochs']} epochs per method, "
             f"seeds {meta['seeds']}, train examples {meta['train_examples']}, command `{meta['command']}`", "",
             "| budget (rel. BOPs %) | method | achieved rel. BOPs % | within budget | accuracy % (mean, spread) | "
             "train s | runs needed |", "|---:|---|---:|---|---:|---:|---:|"]
    for r in sorted(table, key=lambda r: (r["budget"] if r["budget"] is not None else 99, r["method"])):
        acc = "n/a" if r["accuracy_mean"] is None else f"{r['accuracy_mean']:.2f} ± {r['accuracy_spread'] / 2:.2f}"
        rel = "n/a" if r["rel_bops"] is None else f"{r['rel_bops']:.3f}"
        budget = "-" if r["budget"] is None else f"{r['budget']:g}"
        lines.append(f"| {budget} | {r['method']} | {rel} | {'yes' if r['within_budget'] else 'NO'} | {acc} | "
                     f"{r['seconds']:.0f} | {r['runs_needed']} |")
    mc = meta["method_cost"]
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
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = TASKS[args.task]
    try:
        bundle = data.load_data(args.data or args.task, args.subset, 0)
    except DataError as exc:
        sys.exit(f"error: {exc.message}\nhint: {exc.hint or ''} (Debian: apt-get update && apt-get install -y dataset-fashion-mnist)")
    full = data.load_data(args.data or args.task, None, 0)
    model = float_checkpoint(args.task, full, cfg)
    loaders = data.make_loaders(bundle, cfg["batch"], 0, 0)
    float_acc = evaluate(model, loaders[1], CE, "cpu")["accuracy"]
    print(f"float accuracy {float_acc:.2f}%", flush=True)
    methods = args.methods.split(",")
    rows = []
    runners = {"cgmq": run_cgmq, "uniform": run_uniform, "sensitivity": run_sensitivity, "penalty": run_penalty}
    for budget_pct in [float(b) for b in args.budgets.split(",")]:
        for seed in range(args.seeds):
            seed_loaders = data.make_loaders(bundle, cfg["batch"], 0, seed)  # the seed sets the data order
            for method in [m for m in methods if m in runners]:
                result = runners[method](model, bundle, seed_loaders, Budget(rel_bops=budget_pct), args.epochs, seed)
                rows.append({"method": method, "budget": budget_pct, "seed": seed, **result})
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("bits", "tried")}), flush=True)
    if "ort-int8" in methods:
        rows.append({"method": "onnxruntime int8 PTQ", "budget": None, "seed": 0, **run_ort_int8(model, bundle, loaders)})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"task": args.task, "float_accuracy": float_acc, "epochs": args.epochs, "seeds": args.seeds,
            "train_examples": len(bundle.train), "command": " ".join(["python", "benchmarks/suite.py", *sys.argv[1:]]),
            "torch": torch.__version__, "method_cost": method_cost(model, bundle, loaders)}
    name = args.name or f"{args.task}" + (f"-subset{args.subset}" if args.subset else "")
    table = summarize(rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "summary": table, "runs": rows}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(name, meta, table))
    plot(table, RESULTS / f"{name}.png", float_acc)
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
