"""Terminal output: Rich tables on a terminal, plain text otherwise, JSON on stdout.

No colour or progress bars when stdout is not a terminal or NO_COLOR is set
(Rich honours both). Logs and errors go to stderr so that ``--json`` output on
stdout stays one clean JSON object. Every text that reaches the terminal here
passes :func:`cgmq_cli.sanitize.clean` (control characters and bidi marks
escaped; JSON output is escaped by the JSON encoder).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterable

from rich.console import Console
from rich.table import Table

from cgmq_cli.report import coverage_line

from cgmq_cli.sanitize import clean


def _width(stream: Any) -> int | None:
    """Terminal width on a terminal; wide enough for whole tables in logs and pipes."""
    return None if stream.isatty() or os.environ.get("COLUMNS") else 200


def stdout() -> Console:
    """Rich console on stdout; no markup, so ``[red]`` in a layer or file name is printed as written."""
    return Console(file=sys.stdout, highlight=False, markup=False, soft_wrap=True, width=_width(sys.stdout))


def stderr() -> Console:
    return Console(file=sys.stderr, highlight=False, markup=False, soft_wrap=True, width=_width(sys.stderr))


def error(message: str, hint: str | None = None) -> None:
    """``error: ...`` and an optional ``hint: ...`` on stderr, no markup interpretation."""
    sys.stderr.write(f"error: {clean(message)}\n")
    if hint:
        sys.stderr.write(f"hint: {clean(hint)}\n")


def info(message: str) -> None:
    sys.stderr.write(clean(message) + "\n")
    sys.stderr.flush()


def json_out(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def human(n: float) -> str:
    """1814073344 -> '1.81G'."""
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.2f}"


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]], right: Iterable[str] = ()) -> Table:
    right = set(right)
    t = Table(title=clean(title), title_justify="left")
    for col in columns:
        t.add_column(clean(col), justify="right" if col in right else "left")
    for row in rows:
        t.add_row(*[clean(c) for c in row])
    return t


def inspect_table(result: Any) -> None:
    t = result.totals
    total = t["macs"] or 1
    rows = [(l["name"], l["op"], f"{l['macs']:,}", f"{l['params']:,}", f"{100 * l['macs'] / total:.1f}%")
            for l in result.layers]
    rows += [(f"{op['what']} (float)", "-", f"{op['macs']:,}", "", f"{100 * op['macs'] / total:.1f}%")
             for op in result.float_ops]
    rows.append(("total", "", f"{t['macs']:,}", f"{t['params']:,}", "100.0%"))
    console = stdout()
    console.print(table(f"{result.model}  input 1x{'x'.join(map(str, result.sample_shape))}",
                        ("layer", "op", "MACs", "params", "share"), rows, right=("MACs", "params", "share")))
    console.print(f"{len(result.layers)} quantizable layers, {human(t['macs'])} MACs, "
                  f"float BOPs (32x32) {human(t['bops_fp32'])}")
    console.print(coverage_line(t["coverage"], result.float_ops))


def profiles_table(rows: list[dict]) -> None:
    stdout().print(table("hardware profiles (presets/)", ("name", "weights", "activations", "input", "cost", "description"),
                         [(r["name"], ",".join(map(str, r["weight_bits"])), ",".join(map(str, r["act_bits"])),
                           r["input_bits"], r["cost"], r["description"]) for r in rows]))


def live_allowed(console: Console) -> bool:
    """Progress bars only on a terminal: stdout and the console a tty, and NO_COLOR not set."""
    return console.is_terminal and sys.stdout.isatty() and not os.environ.get("NO_COLOR")


class TrainProgress:
    """Training events -> a Rich progress bar on a terminal, plain log lines otherwise (CI)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or stderr()
        self.live = live_allowed(self.console)
        self.progress = None
        self.task = None

    def __enter__(self) -> "TrainProgress":
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=self.console, transient=True)
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, event: Any) -> None:
        d, epoch = event.data, event.epoch + 1
        if event.kind == "info":
            self._line(f"note: {d['message']}")
        elif event.kind == "epoch_start":
            self.current = f"epoch {epoch}/{d['epochs']} {d['epoch_kind']}"
            if self.progress is not None:
                if self.task is not None:
                    self.progress.remove_task(self.task)
                self.task = self.progress.add_task(self.current, total=None)
        elif event.kind == "progress":
            extra = f" cost/budget {d['load']:.3f} rel_bops {d['rel_bops']:.3f}%" if d["phase"] == "gate" else ""
            if self.progress is not None:
                self.progress.update(self.task, completed=d["step"], total=d["steps"],
                                     description=f"{self.current} loss {d['loss']:.4f}{extra}")
            elif d["phase"] == "gate":
                self._line(f"epoch {epoch} {d['phase']} step {d['step']}/{d['steps']} loss {d['loss']:.4f}{extra}")
        elif event.kind == "epoch_end":
            within = "within budget" if d["within_budget"] else "OVER budget"
            gate = ""
            if d["epoch_kind"] == "gate":
                gate = (f" | gate: cost/budget {d['min_load']:.3f}..{d['max_load']:.3f}, crossed {d['crossings']}x,"
                        f" {d['load_before_finish']:.3f} -> repair {len(d['repaired'])} / fill {len(d['filled'])}"
                        f" -> {d['load_after_finish']:.3f}")
            self._line(f"epoch {epoch} {d['epoch_kind']}: val acc {d['accuracy']:.2f}% loss {d['loss']:.4f} "
                       f"rel BOPs {d['rel_bops']:.3f}% {within}{gate}")
        elif event.kind == "bad_batch":
            self._line(f"warning: non-finite loss, batch skipped ({d['count']} so far)")

    def _line(self, text: str) -> None:
        text = clean(text)
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            info(text)


def compress_summary(report: dict, run_dir: Any) -> None:
    c, b = report["cost"], report["budget"]
    lines = [f"run: {run_dir}",
             f"accuracy: float {report['accuracy']['float']:.2f}%  quantized {report['accuracy']['quantized']:.2f}%",
             f"cost: {c['bops']:,} BOPs ({c['rel_bops']:.3f}% of 32x32), weights {c['weight_bytes']:,.0f} bytes"]
    for name, limit in b.items():
        if limit is not None:
            lines.append(f"budget {name}: {limit:,.6g}  used {c[name]:,.6g} ({100 * c[name] / limit:.1f}%)")
    lines.append("within budget: " + ("yes" if report["feasible"] else "NO"))
    out = stdout()
    for line in lines:
        out.print(clean(line), markup=False, highlight=False)


def export_summary(result: Any) -> None:
    q = result.qdq
    out = stdout()
    say = lambda text: out.print(clean(text), markup=False, highlight=False)  # noqa: E731
    say(f"wrote {q.path} (opset {q.opset}, {q.size_bytes:,} bytes)")
    if result.float is not None:
        f = result.float
        say(f"wrote {f.path} (float, {f.size_bytes:,} bytes); QDQ file is {100 * q.size_bytes / f.size_bytes:.1f}% of it")
    if q.parity is not None:
        p = q.parity
        say(f"parity with PyTorch on {result.parity_source}: top-1 agreement {p.agreement:.2f}%, "
            f"max |logit diff| {p.max_abs_diff:.3g}")
    say(f"BOPs read back from the file: {result.report_bops:,} (equal to report.json)")
    if q.kernels:
        fused = sum(f.integer for f in q.kernels)
        say(f"integer kernels in onnxruntime: {fused} of {len(q.kernels)} ops the profile runs as integer"
            + ("" if fused == len(q.kernels) else " (--allow-float-fallback: the others run in float)"))
    if result.latency_ms:
        lat = result.latency_ms
        line = f"onnxruntime latency (median, batch 1): QDQ {lat['qdq']:.3f} ms"
        if "float" in lat:
            line += f", float {lat['float']:.3f} ms, ratio {lat['ratio_qdq_over_float']:.2f}x"
        say(line)


def verify_table(path: Any, result: Any, bops: float | None, weight_bytes: float | None, openvino: Any = None) -> None:
    rows = [(l.node, l.op, f"{l.macs:,}", f"{l.bits_w}/{l.bits_a}", f"{l.bops:,}", f"{l.weight_bytes:,.0f}", l.lint)
            for l in result.layers]
    columns = ["node", "op", "MACs", "bits w/a", "BOPs", "weight bytes", "onnxruntime CPU"]
    if openvino is not None:
        rows = [(*row, layer.text()) for row, layer in zip(rows, openvino.layers)]
        columns.append("OpenVINO CPU")
    out = stdout()
    out.print(table(f"{path} (opset {result.opset})", columns, rows, right=("MACs", "BOPs", "weight bytes")))
    rel = 100 * result.bops / (result.macs * 1024) if result.macs else 0.0
    other = f" + {result.other_bytes:,.0f} bytes of float parameters" if result.other_bytes else ""
    lines = [f"total: {result.macs:,} MACs, {result.bops:,} BOPs ({rel:.3f}% of 32x32), "
             f"{result.weight_bytes:,.0f} weight bytes{other}",
             f"coverage: {result.coverage:.1f}% of the MACs read quantized operands",
             "loads in onnxruntime (CPU, default options): " + ("yes" if result.loads else f"NO ({result.load_error})")]
    if openvino is not None:
        ov = openvino
        lines.append(f"loads in OpenVINO {ov.version} (CPU): yes; {sum(l.int8 for l in ov.layers)} of {len(ov.layers)} "
                     f"layers run in int8; outputs vs onnxruntime on {ov.examples} random inputs: top-1 agreement "
                     f"{ov.agreement:.2f}%, max |diff| {ov.max_abs_diff:.3g}" + "".join(f"; {n}" for n in ov.notes))
    for label, value, limit in (("BOPs", result.bops, bops),
                                ("weight bytes", result.weight_bytes + result.other_bytes, weight_bytes)):
        if limit is not None:
            lines.append(f"budget {label}: {value:,.0f} <= {limit:,.0f}: {'yes' if value <= limit else 'NO'}")
    for line in lines:
        out.print(clean(line), markup=False, highlight=False)
