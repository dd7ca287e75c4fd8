"""What the finish's table says about other layouts: the state a gate epoch ends in, the finish's plan, and
layouts given by hand, scored by the finish's own table (read as additive) and by the probe-set loss measured
at each, right after the gate epoch of a full-data Fashion-MNIST run (no weight epochs follow).

    python benchmarks/finish_layouts.py --budget 1.73 --seed 0      # writes results/finish-layouts-1.73-s0.json, .md

It asks whether the finish, given the gate state, could have chosen a layout that its own measurements rate
better: ``suite.py``'s ``layout-recipe`` rows say how those layouts train; this says how the finish sees them.
Layouts (quantizer key -> bits, the rest as the gate epoch left them) are LeNet-5's 4/4-like ones that fit 1.73 %.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cgmq_cli import compress as cmp  # noqa: E402
from cgmq_cli import trainer as tr  # noqa: E402
from cgmq_cli.cost import Budget  # noqa: E402
from cgmq_cli.trainer import TrainConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FOUR = dict(w_features_0=4, a_features_2=4, w_features_3=4, a_classifier_0=4, w_classifier_1=4)
LAYOUTS = {"fc2w2a2": {**FOUR, "a_classifier_2": 2, "w_classifier_3": 2},
           "conv1w2": {**FOUR, "w_features_0": 2, "a_classifier_2": 16, "w_classifier_3": 16}}


class _Done(Exception):
    pass


def score(budget: float, seed: int) -> dict:
    """Run compress up to the end of its first finish and score the gate state, the plan and LAYOUTS there."""
    found: dict = {}
    plain_finish, plain_table = tr.Trainer.finish, tr.Trainer._finish_table

    def table(self, *args, **kwargs):  # the finish's first table is the one taken at the gate state
        result = plain_table(self, *args, **kwargs)
        found.setdefault("first_table", result)
        return result

    def finish(self, epoch):
        batches = self.probe_set(epoch)
        gate = self.qm.widths()
        moves = plain_finish(self, epoch)
        pred, _, kind = found.pop("first_table")
        layouts = {"gate epoch": gate, "finish (cgmq)": self.qm.widths(),
                   **{name: {**gate, **lay} for name, lay in LAYOUTS.items()}}
        found.update(table=kind, moves={k: moves[k] for k in ("repaired", "filled", "undone")},
                     probe_loss_gate=self.probe_loss(batches, gate), layouts={})
        for name, widths in layouts.items():
            additive = sum(float(pred.get(k, {}).get(w, 0.0)) for k, w in widths.items() if w != gate[k])
            found["layouts"][name] = {"widths": widths, "rel_bops": self.costs.summary(widths).rel_bops,
                                      "table_sum": additive, "probe_loss": self.probe_loss(batches, widths)}
        raise _Done

    tr.Trainer.finish, tr.Trainer._finish_table = finish, table
    try:
        with tempfile.TemporaryDirectory() as tmp:
            settings = cmp.CompressSettings(model=str(RESULTS / "fashion-mnist-float-seed0.pt"),
                                            arch="cgmq_cli.models:LeNet5", data="fashion-mnist", out=f"{tmp}/run",
                                            budget=Budget(rel_bops=budget), batch_size=128, seed=seed, train=TrainConfig())
            cmp.compress(settings)
    except _Done:
        pass
    finally:
        tr.Trainer.finish, tr.Trainer._finish_table = plain_finish, plain_table
    return found


def markdown(budget: float, seed: int, found: dict, command: str) -> str:
    lines = [f"# The finish's view of other layouts at {budget:g} % (seed {seed})", "",
             f"Full Fashion-MNIST, LeNet-5 from `fashion-mnist-float-seed0.pt`, defaults, the first finish "
             f"(table: {found['table']}); probe-set loss at the gate state {found['probe_loss_gate']:.4f}. "
             f"Command: `{command}`.", "",
             "| layout | widths (w conv1, a conv2, w conv2, a fc1, w fc1, a fc2, w fc2) | rel. BOPs % | table sum | probe loss |",
             "|---|---|---:|---:|---:|"]
    order = ("w_features_0", "a_features_2", "w_features_3", "a_classifier_0", "w_classifier_1", "a_classifier_2",
             "w_classifier_3")
    for name, row in found["layouts"].items():
        widths = ", ".join(str(row["widths"].get(k, "-")) for k in order)
        lines.append(f"| {name} | {widths} | {row['rel_bops']:.4f} | {row['table_sum']:+.4f} | {row['probe_loss']:.4f} |")
    moves = "; ".join(f"{kind}: " + ", ".join(f"{m['tensor']} {m['old']}->{m['new']}" for m in found["moves"][kind])
                      for kind in ("repaired", "filled", "undone") if found["moves"][kind])
    lines += ["", f"The finish's moves: {moves or 'none'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=1.73, help="relative BOPs, percent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    found = score(args.budget, args.seed)
    name = f"finish-layouts-{args.budget:g}-s{args.seed}"
    command = shlex.join(["python", "benchmarks/finish_layouts.py", *sys.argv[1:]])
    (RESULTS / f"{name}.json").write_text(json.dumps({"command": command, "torch": torch.__version__, **found},
                                                     indent=1) + "\n")
    text = markdown(args.budget, args.seed, found, command)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
