"""A small vision transformer on Fashion-MNIST: CGMQ against uniform QAT of the same epochs.

    python benchmarks/transformer.py [--epochs 6] [--budgets 0.8,1.73,3.0]

Model: ``cgmq_cli.models:TinyViT`` (7x7 patches, 17 tokens, width 64, three
blocks of ``nn.MultiheadAttention`` with 4 heads and a 2x MLP): every
projection, both attention products (q @ k^T, p @ v; each operand with its own
gate) and the patch embedding are quantized and budgeted; LayerNorm, the
class token and the position table count at 32 bits in weight bytes.

Protocol: one float checkpoint (seed 0, Adam 1e-3, batch 128, ``--float-epochs``
on all 60,000 training images; cached as results/transformer-float-seed0.pt);
from it, with the same MSE calibration, CGMQ with its default TrainConfig and
uniform QAT (the widest uniform (b_w, b_a) within budget, then weight epochs
only) each get ``--epochs`` epochs; test accuracy on the 10,000 test images.
Every finished run is cached in results/transformer-fashion-mnist.json, so an
interrupted benchmark resumes. Writes that JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402

from cgmq_cli import data, models, qmodel  # noqa: E402
from cgmq_cli.cost import Budget  # noqa: E402
from cgmq_cli.trainer import Trainer, TrainConfig, evaluate, train_float  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "transformer-fashion-mnist"
CE = nn.functional.cross_entropy


def float_model(bundle: data.DataBundle, epochs: int) -> tuple[nn.Module, float]:
    path = RESULTS / "transformer-float-seed0.pt"
    model = models.TinyViT()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        loader, _ = data.make_loaders(bundle, 128, 0, 0)
        train_float(model, loader, epochs, 1e-3, seed=0)
        torch.save(model.state_dict(), path)
    _, val = data.make_loaders(bundle, 256, 0, 0)
    return model.eval(), evaluate(model, val, CE, "cpu")["accuracy"]


def run(method: str, model: nn.Module, bundle: data.DataBundle, budget: Budget, epochs: int) -> dict:
    torch.manual_seed(0)
    qm = qmodel.prepare(copy.deepcopy(model), bundle.sample_shape)
    qm.calibrate(data.calibration_batch(bundle, 256, 0))
    train, val = data.make_loaders(bundle, 128, 0, 0)
    config = TrainConfig(epochs=epochs)
    if method == "uniform":
        widths = baselines.uniform_bits(qm, budget)
        if widths is None:
            return {"method": method, "note": "no uniform width pair fits"}
        qm.set_widths(widths)
        config = TrainConfig(epochs=epochs, rounds=0)
    start = time.time()
    state = Trainer(qm, train, val, budget, config).run()
    seconds = time.time() - start
    cost = qm.cost()
    return {"method": method, "rel_bops": cost.rel_bops, "weight_bytes": cost.weight_bytes,
            "within_budget": budget.is_satisfied_by(cost), "accuracy": evaluate(qm.gm, val, CE, "cpu")["accuracy"],
            "seconds": seconds, "per_epoch_accuracy": [h["accuracy"] for h in state.history],
            "bits": {k: list(v) for k, v in qm.bits().items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--float-epochs", type=int, default=8)
    parser.add_argument("--budgets", default="0.8,1.73,3.0")
    parser.add_argument("--data", default="fashion-mnist")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    bundle = data.load_data(args.data)
    model, float_acc = float_model(bundle, args.float_epochs)
    out_path = RESULTS / f"{NAME}.json"
    done = json.loads(out_path.read_text()) if out_path.exists() else {}
    done.update({"float_accuracy": float_acc, "float_epochs": args.float_epochs, "epochs": args.epochs,
                 "threads": torch.get_num_threads(), "macs": qmodel.prepare(copy.deepcopy(model),
                                                                            bundle.sample_shape).cost().macs})
    runs = done.setdefault("runs", {})
    for budget in (float(b) for b in args.budgets.split(",")):
        for method in ("cgmq", "uniform"):
            key = f"{method}@{budget:g}"
            if key in runs:
                continue
            runs[key] = {"budget": budget, **run(method, model, bundle, Budget(rel_bops=budget), args.epochs)}
            if out_path.exists():  # another process may have added runs meanwhile (budgets run in parallel)
                runs.update({k: v for k, v in json.loads(out_path.read_text()).get("runs", {}).items()
                             if k not in runs})
            out_path.write_text(json.dumps(done, indent=2) + "\n")
            print(key, {k: v for k, v in runs[key].items() if k != "bits"}, flush=True)
    done["runs"] = {**json.loads(out_path.read_text()).get("runs", {}), **runs} if out_path.exists() else runs
    (RESULTS / f"{NAME}.md").write_text(markdown(done))


def markdown(done: dict) -> str:
    lines = [f"# TinyViT on Fashion-MNIST: CGMQ vs uniform QAT ({done['epochs']} epochs each)", "",
             f"Float checkpoint: {done['float_accuracy']:.2f} % test accuracy after {done['float_epochs']} epochs "
             f"(seed 0); {done['macs']:,} MACs per image; {done['threads']} threads.", "",
             "| budget % rel. BOPs | cgmq acc % @ rel. BOPs | uniform QAT acc % @ rel. BOPs | cgmq s | uniform s |",
             "|---:|---:|---:|---:|---:|"]
    budgets = sorted({r["budget"] for r in done["runs"].values()})
    for b in budgets:
        c, u = done["runs"].get(f"cgmq@{b:g}", {}), done["runs"].get(f"uniform@{b:g}", {})

        def cell(r: dict) -> str:
            if "accuracy" not in r:
                return r.get("note", "-")
            return f"{r['accuracy']:.2f} @ {r['rel_bops']:.3f}" + ("" if r["within_budget"] else " (OVER)")

        lines.append(f"| {b:g} | {cell(c)} | {cell(u)} | {c.get('seconds', 0):.0f} | {u.get('seconds', 0):.0f} |")
    lines += ["", "Command: `python benchmarks/transformer.py` (results cached per run in the JSON file)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
