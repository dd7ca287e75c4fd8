"""Start-up time of the commands that must not load torch, as a ratio to ``python -c "import typer, rich"``.

    python benchmarks/startup.py [--repeats 15] [--out benchmarks/results]

Each round runs every command once, in a rotated order (so that no command
always runs first or right after the baseline), and the medians over the
rounds are compared: ``ratio = median(command) / median(baseline)``. The
acceptance bound of issue 15 is 1.5 for ``cgmq --help`` and ``cgmq report RUN``
(stdout a pipe, as in CI; the row "on a terminal" gives stdout a pseudo-terminal,
where rich draws the tables and its import counts).
RUN is a hand-written finished run in a temporary directory (report.json only
matters to ``report`` and ``check``). Results go to ``startup.json`` and
``startup.md`` in ``--out``. Wall-clock times of whole processes on this
machine; the ratio removes most of the machine's speed. Bytecode is cached
(in a private ``PYTHONPYCACHEPREFIX``) as for any installed package.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOUND = 1.5


def _fixture_run(folder: Path) -> Path:
    run = folder / "runs" / "r"
    run.mkdir(parents=True)
    (run / ".cgmq-run").write_text(json.dumps({"format": "cgmq-run/1", "id": "bench", "path": str(run.resolve())}))
    (run / "config.json").write_text("{}")
    layers = [{"name": n, "op": "conv2d", "macs": m, "params": 100, "bits_w": 4, "bits_a": 8, "bops": m * 32,
               "weight_bytes": 50.0} for n, m in (("conv1", 10_000), ("conv2", 30_000), ("fc", 2_000))]
    bops = sum(l["bops"] for l in layers)
    report = {"run": "r", "model": {"arch": "pkg:Net"}, "profile": "generic", "data": "digits", "epochs": 6,
              "seconds": 3.0, "budget": {"bops": 2e6, "rel_bops": None, "weight_bytes": None, "cost": None},
              "cost": {"bops": bops, "rel_bops": 100 * bops / (42_000 * 1024), "weight_bytes": 150.0, "cost": bops,
                       "macs": 42_000, "bops_fp32": 42_000 * 1024},
              "feasible": True, "accuracy": {"float": 99.0, "quantized": 98.5}, "layers": layers, "history": []}
    (run / "report.json").write_text(json.dumps(report))
    return run


def commands(run: Path) -> dict[str, list[str]]:
    py = sys.executable
    cgmq = [py, "-m", "cgmq_cli"]
    return {
        "baseline: python -c 'import typer, rich'": [py, "-c", "import typer, rich"],
        "python -c pass": [py, "-c", "pass"],
        "cgmq --help": [*cgmq, "--help"],
        "cgmq report RUN": [*cgmq, "report", str(run)],
        TERMINAL: [*cgmq, "report", str(run)],
        "cgmq check RUN": [*cgmq, "check", str(run)],
        "cgmq profiles": [*cgmq, "profiles"],
    }


TERMINAL = "cgmq report RUN (on a terminal)"


def _time(cmd: list[str], env: dict, terminal: bool = False) -> float:
    """Wall time of one run; with ``terminal`` stdout is a pseudo-terminal (rich draws the tables)."""
    main = sub = None
    if terminal:
        import pty

        main, sub = pty.openpty()
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, stdout=sub if terminal else subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    finally:
        if terminal:
            os.close(sub)
            while True:  # drain what the command wrote
                try:
                    if not os.read(main, 65536):
                        break
                except OSError:
                    break
            os.close(main)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[:300]}")
    return took


def measure(repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        # Bytecode as in any installed package (even where PYTHONDONTWRITEBYTECODE is set): cached in a
        # private prefix by the warm-up round, so that no command pays for compiling its sources.
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "NO_COLOR": "1",
               "COLUMNS": "120", "PYTHONPYCACHEPREFIX": str(Path(tmp) / "pycache")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        cmds = commands(_fixture_run(Path(tmp)))
        names = list(cmds)
        for name in names:  # warm the file cache and the bytecode
            _time(cmds[name], env, name == TERMINAL)
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(repeats):
            for name in names[i % len(names):] + names[:i % len(names)]:
                times[name].append(_time(cmds[name], env, name == TERMINAL))
    base = statistics.median(times[names[0]])
    rows = {name: {"median_s": statistics.median(ts), "min_s": min(ts), "ratio": statistics.median(ts) / base}
            for name, ts in times.items()}
    return {"repeats": repeats, "python": sys.version.split()[0], "machine": platform.machine(),
            "cpus": os.cpu_count(), "bound": BOUND, "commands": rows,
            "within_bound": all(rows[n]["ratio"] <= BOUND for n in ("cgmq --help", "cgmq report RUN"))}


def markdown(result: dict) -> str:
    out = ["# Start-up time", "",
           f"Medians of {result['repeats']} rotated rounds, Python {result['python']}, {result['cpus']} CPUs "
           f"({result['machine']}); ratio to `python -c \"import typer, rich\"`; bound {result['bound']} for "
           "`cgmq --help` and `cgmq report RUN`.", "",
           "| command | median (s) | min (s) | ratio |", "|---|---:|---:|---:|"]
    out += [f"| `{name}` | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['ratio']:.2f} |"
            for name, r in result["commands"].items()]
    out += ["", f"Within the bound: {'yes' if result['within_bound'] else 'NO'}.", "",
            "Command: `python benchmarks/startup.py`."]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    result = measure(args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "startup.md").write_text(markdown(result))
    sys.stdout.write(markdown(result))


if __name__ == "__main__":
    main()
