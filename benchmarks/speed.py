"""What the finish costs: cgmq compress of resnet18 at 3 x 112 x 112 (int8-cpu) against uniform QAT of the same epochs.

    python benchmarks/speed.py                      # writes results/speed-resnet18.json and .md

Data: ``benchmarks/datasets.py:fmnist112`` (Fashion-MNIST resized to 3 x 112 x 112: 2,048 training
images by default, 512 test images). Model: torchvision resnet18 (10 classes), trained from scratch
in float for ``--float-epochs`` first, so that the probes see a model that has learnt something.
Both runs take the same epochs, batch size and data; they run one after the other in this process,
in the order given by ``--order``, so their times are a ratio on one machine at one time.

cgmq runs as ``cgmq compress`` does, with every default except ``--gate-steps 0`` (a gate epoch is one
pass over the data, as on any data set of at least 300 batches; the default minimum of 300 batches
would make gate epochs on this small set several passes long, and the finish's share smaller).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import baselines  # noqa: E402

from cgmq_cli import api, compress as cmp, data  # noqa: E402
from cgmq_cli.cost import Budget  # noqa: E402
from cgmq_cli.profiles import load_profile  # noqa: E402
from cgmq_cli.trainer import TrainConfig, Trainer, evaluate, train_float  # noqa: E402

RESULTS = HERE / "results"
DATA = f"{HERE / 'datasets.py'}:fmnist112"


def float_model(path: Path, loader, epochs: int) -> Path:
    import torchvision

    if not path.exists():
        model = torchvision.models.resnet18(num_classes=10)
        train_float(model, loader, epochs, 1e-3, seed=0)
        torch.save(model.state_dict(), path)
    return path


def run_cgmq(ckpt: Path, args) -> dict:
    explain = {"seconds": 0.0}
    original = Trainer.explain

    def timed(self):  # the report's per-tensor explanation: one more probe pass, timed apart from the finish
        start = time.perf_counter()
        try:
            return original(self)
        finally:
            explain["seconds"] += time.perf_counter() - start

    Trainer.explain = timed
    try:
        with tempfile.TemporaryDirectory() as tmp:
            settings = cmp.CompressSettings(model=str(ckpt), arch="torchvision:resnet18", data=DATA, subset=args.train,
                                            out=f"{tmp}/run", budget=Budget(rel_bops=args.budget), profile="int8-cpu",
                                            batch_size=args.batch, train=TrainConfig(epochs=args.epochs, gate_steps=0))
            start = time.time()
            report = cmp.compress(settings).report
            wall = time.time() - start
    finally:
        Trainer.explain = original
    gates = [h for h in report["history"] if h["epoch_kind"] == "gate"]
    finish = sum(h["finish_seconds"] for h in gates)
    return {"seconds": wall, "finish_seconds": finish, "finish_share": finish / wall,
            "explain_seconds": explain["seconds"], "moves": [len(h["repaired"]) + len(h["filled"]) for h in gates],
            "probe_batches_used": [h["probe_batches_used"] for h in gates], "accuracy": report["accuracy"]["quantized"],
            "rel_bops": report["cost"]["rel_bops"], "within_budget": report["feasible"]}


def run_uniform(ckpt: Path, bundle, args) -> dict:
    """LSQ QAT with every tensor at 8 bits (the uniform assignment int8-cpu allows), same epochs and data."""
    import torchvision

    start = time.time()
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    qm = api.prepare(model, bundle.sample_shape, (), load_profile("int8-cpu"))
    qm.calibrate(data.calibration_batch(bundle, 256, 0))
    qm.set_widths(baselines.uniform_widths(qm, 8, 8))
    train, val = data.make_loaders(bundle, args.batch, 0, 0)
    budget = Budget(rel_bops=args.budget)
    trainer = Trainer(qm, train, val, budget, TrainConfig(epochs=args.epochs, rounds=0))
    trainer.run()
    acc = evaluate(qm.gm, val, torch.nn.functional.cross_entropy, "cpu")["accuracy"]
    return {"seconds": time.time() - start, "accuracy": acc, "rel_bops": qm.cost().rel_bops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=2048, help="training images (a fixed subset of fmnist112)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--float-epochs", type=int, default=2)
    parser.add_argument("--budget", type=float, default=8.0, help="relative BOPs %% (all 8-bit is 6.25 %%)")
    parser.add_argument("--order", default="cgmq,uniform")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = data.load_data(DATA, args.train, 0)
    ckpt = float_model(RESULTS / f"resnet18-fmnist112-{args.train}-float-seed0.pt",
                       data.make_loaders(bundle, args.batch, 0, 0)[0], args.float_epochs)
    out = {"command": " ".join(["python", "benchmarks/speed.py", *sys.argv[1:]]), "threads": args.threads,
           "train_images": args.train, "batch": args.batch, "epochs": args.epochs, "budget_rel_bops": args.budget,
           "torch": torch.__version__}
    for name in args.order.split(","):
        out[name] = run_cgmq(ckpt, args) if name == "cgmq" else run_uniform(ckpt, bundle, args)
        print(name, json.dumps(out[name]), flush=True)
    if "cgmq" in out and "uniform" in out:
        out["ratio_cgmq_over_uniform"] = out["cgmq"]["seconds"] / out["uniform"]["seconds"]
    (RESULTS / "speed-resnet18.json").write_text(json.dumps(out, indent=2) + "\n")
    c = out.get("cgmq", {})
    lines = ["# speed-resnet18", "", f"`{out['command']}`: resnet18 at 3x112x112, profile int8-cpu, "
             f"{args.train} training images (fmnist112), batch {args.batch}, {args.epochs} epochs, "
             f"torch threads {args.threads}.", ""]
    if c:
        lines.append(f"cgmq compress: {c['seconds']:.0f} s, of which the finish {c['finish_seconds']:.1f} s "
                     f"({100 * c['finish_share']:.1f} %; moves per finish {c['moves']}, probe batches used "
                     f"{c['probe_batches_used']}); the report's per-tensor explanation {c['explain_seconds']:.1f} s. "
                     f"{c['rel_bops']:.3f} % rel. BOPs, within budget: {c['within_budget']}, accuracy {c['accuracy']:.2f} %.")
    if "uniform" in out:
        u = out["uniform"]
        lines.append(f"uniform 8-bit QAT, same epochs: {u['seconds']:.0f} s, accuracy {u['accuracy']:.2f} %.")
    if "ratio_cgmq_over_uniform" in out:
        lines.append(f"compress / uniform QAT: {out['ratio_cgmq_over_uniform']:.2f}x.")
    (RESULTS / "speed-resnet18.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
