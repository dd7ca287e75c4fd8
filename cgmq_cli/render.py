"""Terminal output: Rich tables on a terminal, plain text otherwise, JSON on stdout.

No colour or progress bars when stdout is not a terminal or NO_COLOR is set
(Rich honours both). Logs and errors go to stderr so that ``--json`` output on
stdout stays one clean JSON object. Every text that reaches the terminal here
passes :func:`cgmq_cli.sanitize.clean` (control characters and bidi marks
escaped; JSON output is escaped by the JSON encoder).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator


from cgmq_cli.sanitize import clean

if TYPE_CHECKING:  # rich's console and table load on first output, not when the CLI starts
    from rich.console import Console
    from rich.table import Table


def _width(stream: Any) -> int | None:
    """Terminal width on a terminal; wide enough for whole tables in logs and pipes."""
    return None if stream.isatty() or os.environ.get("COLUMNS") else 200


def stdout() -> Console:
    """Rich console on stdout; no markup, so ``[red]`` in a layer or file name is printed as written."""
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False, markup=False, soft_wrap=True, width=_width(sys.stdout))


def stderr() -> Console:
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False, markup=False, soft_wrap=True, width=_width(sys.stderr))


def error(message: str, hint: str | None = None) -> None:
    """``error: ...`` and an optional ``hint: ...`` on stderr, no markup interpretation."""
    sys.stderr.write(f"error: {clean(message)}\n")
    if hint:
        sys.stderr.write(f"hint: {clean(hint)}\n")


def json_error(message: str, hint: str | None, exit_code: int, result: dict | None = None) -> None:
    """The one JSON object a failed ``--json`` command prints: its result (if any) plus error, hint, exit code."""
    json_out({**(result or {}), "error": message, "hint": hint, "exit_code": exit_code})


def info(message: str) -> None:
    sys.stderr.write(clean(message) + "\n")
    sys.stderr.flush()


_JSON_TARGET: list = []  # the real stdout while --json sends everything else to stderr


@contextlib.contextmanager
def json_only_stdout() -> Iterator[None]:
    """Under ``--json`` stdout carries the one JSON object: anything else printed (an arch or data module's
    ``print``) goes to stderr meanwhile."""
    _JSON_TARGET.append(sys.stdout)
    saved, sys.stdout = sys.stdout, sys.stderr
    try:
        yield
    finally:
        sys.stdout = saved
        _JSON_TARGET.pop()


def json_out(obj: Any) -> None:
    target = _JSON_TARGET[-1] if _JSON_TARGET else sys.stdout
    target.write(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    target.flush()


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


@dataclass(frozen=True)
class Grid:
    """A table as data: drawn by rich on a terminal, and without importing rich otherwise (see :meth:`plain`)."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    right: frozenset[str] = frozenset()  # right-justified columns

    def _widths(self) -> list[int]:
        return [max([len(col)] + [len(row[i]) for row in self.rows]) for i, col in enumerate(self.columns)]

    def plain(self, width: int) -> str | None:
        """Exactly what rich prints for this table without colour (box ``HEAVY_HEAD``, padding 1), or None.

        None where rich would do more than pad: no rows, text that is not
        plain printable ASCII, a table or title wider than ``width`` (rich
        wraps), repeated column names. tests/unit/test_render.py checks it
        against rich itself.
        """
        cells = [self.title, *self.columns, *(c for row in self.rows for c in row)]
        if not self.rows or any(len(row) != len(self.columns) for row in self.rows) \
                or len(set(self.columns)) != len(self.columns) \
                or not all(c.isascii() and (c.isprintable() or not c) and c == c.strip() for c in cells):
            return None
        widths = self._widths()
        total = sum(widths) + 3 * len(widths) + 1
        if total > width or len(self.title) > total:
            return None

        def edge(left: str, mid: str, end: str, fill: str) -> str:
            return left + mid.join(fill * (w + 2) for w in widths) + end

        def line(values: tuple[str, ...], sep: str) -> str:
            return sep + sep.join(" " + (v.rjust(w) if c in self.right else v.ljust(w)) + " "
                                  for v, w, c in zip(values, widths, self.columns)) + sep

        out = [self.title] if self.title else []
        out += [edge("┏", "┳", "┓", "━"), line(self.columns, "┃"), edge("┡", "╇", "┩", "━")]
        out += [line(row, "│") for row in self.rows] + [edge("└", "┴", "┘", "─")]
        return "\n".join(out)

    def rich(self) -> Table:
        from rich.table import Table

        t = Table(title=self.title or None, title_justify="left")
        for col in self.columns:
            t.add_column(col, justify="right" if col in self.right else "left")
        for row in self.rows:
            t.add_row(*row)
        return t


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]], right: Iterable[str] = ()) -> Grid:
    """A :class:`Grid` of cleaned text (control characters and bidi marks escaped)."""
    return Grid(clean(title), tuple(clean(c) for c in columns), tuple(tuple(clean(c) for c in row) for row in rows),
                frozenset(clean(c) for c in right))


def show(*blocks: Any, stream: Any = None) -> None:
    """Print grids and lines: rich on a terminal; the same text without importing rich elsewhere (pipes, CI)."""
    stream = stream or sys.stdout
    if not stream.isatty():
        limit = int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else 200
        text = [b.plain(limit) if isinstance(b, Grid) else clean(str(b)) for b in blocks]
        if all(t is not None for t in text):
            stream.write("".join(f"{t}\n" for t in text))
            return
    console = stdout() if stream is sys.stdout else stderr()
    for block in blocks:
        console.print(block.rich() if isinstance(block, Grid) else clean(str(block)), markup=False, highlight=False)


def coverage_line(coverage: float, float_ops: list[dict]) -> str:
    """One line on how much of the model's compute is quantized, and what is left in float and why."""
    if not float_ops:
        return f"coverage: {coverage:.1f}% of the MACs are in quantized layers (nothing is left in float)"
    reasons = "; ".join(f"{op['what']}: {op['reason']}" for op in float_ops[:3])
    more = f"; and {len(float_ops) - 3} more" if len(float_ops) > 3 else ""
    return (f"coverage: {coverage:.1f}% of the MACs are in quantized layers; left in float (counted at 32x32 "
            f"bits): {reasons}{more}")


def inspect_table(result: Any) -> None:
    t = result.totals
    total = t["macs"] or 1
    rows = [(l["name"], l["op"], f"{l['macs']:,}", f"{l['params']:,}", f"{100 * l['macs'] / total:.1f}%")
            for l in result.layers]
    rows += [(f"{op['what']} (float)", "-", f"{op['macs']:,}", "", f"{100 * op['macs'] / total:.1f}%")
             for op in result.float_ops]
    rows.append(("total", "", f"{t['macs']:,}", f"{t['params']:,}", "100.0%"))
    show(table(f"{result.model}  input 1x{'x'.join(map(str, result.sample_shape))}",
               ("layer", "op", "MACs", "params", "share"), rows, right=("MACs", "params", "share")),
         f"{len(result.layers)} quantizable layers, {human(t['macs'])} MACs, "
         f"float BOPs (32x32) {human(t['bops_fp32'])}",
         coverage_line(t["coverage"], result.float_ops))


def profiles_table(rows: list[dict]) -> None:
    show(table("hardware profiles (presets/)", ("name", "weights", "activations", "input", "cost", "description"),
               [(r["name"], ",".join(map(str, r["weight_bits"])), ",".join(map(str, r["act_bits"])),
                 r["input_bits"], r["cost"], r["description"]) for r in rows]))


def live_allowed(console: Console) -> bool:
    """Progress bars only on a terminal: stdout and the console a tty, and NO_COLOR not set."""
    return console.is_terminal and sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def clock() -> str:
    """The wall-clock time that prefixes every progress line."""
    return time.strftime("%H:%M:%S")


def duration(seconds: float) -> str:
    """83.2 -> '1:23'; 4000 -> '1:06:40'."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Eta:
    """Remaining time of the current epoch and of the whole run, from the steps done so far.

    The current epoch: its elapsed time per step times the steps left. Later
    epochs: the mean duration of finished epochs of the same kind (gate or
    weight), else of any kind, else the current epoch's projected duration.
    ``schedule`` lists the epoch kinds; without it the remaining epochs are
    assumed to take as long as the epochs seen.
    """

    def __init__(self, schedule: list[str] | None = None, now: Any = time.monotonic) -> None:
        self.schedule, self.now = schedule, now
        self.done: dict[str, list[float]] = {}
        self.epoch, self.epochs, self.kind = 0, 0, ""
        self.started = self.now()
        self.fraction = 0.0

    def start(self, epoch: int, epochs: int, kind: str) -> None:
        self.epoch, self.epochs, self.kind = epoch, epochs, kind
        self.started, self.fraction = self.now(), 0.0

    def step(self, step: int, steps: int) -> None:
        self.fraction = min(max(step / steps, 0.0), 1.0) if steps else 0.0

    def end(self) -> float:
        took = self.now() - self.started
        self.done.setdefault(self.kind, []).append(took)
        self.fraction = 1.0
        return took

    def epoch_left(self) -> float | None:
        if self.fraction <= 0:
            return None
        elapsed = self.now() - self.started
        return elapsed / self.fraction - elapsed

    def _mean(self, kind: str) -> float | None:
        runs = self.done.get(kind) or [t for ts in self.done.values() for t in ts]
        if runs:
            return sum(runs) / len(runs)
        return (self.now() - self.started) / self.fraction if self.fraction > 0 else None

    def total_left(self) -> float | None:
        """Seconds until the last epoch ends (None before anything was measured)."""
        current = self.epoch_left() if self.fraction < 1.0 else 0.0
        if current is None:
            return None
        later = range(self.epoch + 1, self.epochs)
        kinds = [self.schedule[i] if self.schedule and i < len(self.schedule) else self.kind for i in later]
        means = [self._mean(kind) for kind in kinds]
        if any(m is None for m in means):
            return None
        return current + sum(means)

    def text(self) -> str:
        epoch, total = self.epoch_left(), self.total_left()
        parts = []
        if epoch is not None and self.fraction < 1.0:
            parts.append(f"epoch ETA {duration(epoch)}")
        if total is not None:
            parts.append(f"run ETA {duration(total)}")
        return ", ".join(parts)


class TrainProgress:
    """Training events -> a Rich progress bar on a terminal, plain timestamped log lines otherwise (CI).

    Both show the remaining time of the epoch and of the run (:class:`Eta`).
    """

    def __init__(self, console: Console | None = None, schedule: list[str] | None = None, prefix: str = "") -> None:
        self.console = console or stderr()
        self.live = live_allowed(self.console)
        self.progress = None
        self.task = None
        self.eta = Eta(schedule)
        self.prefix = prefix
        self.current = ""

    def __enter__(self) -> "TrainProgress":
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.fields[eta]}"), console=self.console,
                                     transient=True)
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
            self.eta.start(event.epoch, d["epochs"], d["epoch_kind"])
            self.current = f"{self.prefix}epoch {epoch}/{d['epochs']} {d['epoch_kind']}"
            if self.progress is not None:
                if self.task is not None:
                    self.progress.remove_task(self.task)
                self.task = self.progress.add_task(self.current, total=None, eta="")
        elif event.kind == "progress":
            self.eta.step(d["step"], d["steps"])
            extra = f" cost/budget {d['load']:.3f} rel_bops {d['rel_bops']:.3f}%" if d["phase"] == "gate" else ""
            eta = self.eta.text()
            if self.progress is not None:
                self.progress.update(self.task, completed=d["step"], total=d["steps"], eta=eta,
                                     description=f"{self.current} loss {d['loss']:.4f}{extra}")
            elif d["phase"] == "gate":
                self._line(f"epoch {epoch} {d['phase']} step {d['step']}/{d['steps']} loss {d['loss']:.4f}{extra}"
                           + (f" | {eta}" if eta else ""))
        elif event.kind == "epoch_end":
            took = self.eta.end()
            within = "within budget" if d["within_budget"] else "OVER budget"
            gate = ""
            if d["epoch_kind"] == "gate":
                gate = (f" | gate: cost/budget {d['min_load']:.3f}..{d['max_load']:.3f}, crossed {d['crossings']}x,"
                        f" {d['load_before_finish']:.3f} -> repair {len(d['repaired'])} / fill {len(d['filled'])}"
                        f" -> {d['load_after_finish']:.3f}")
            left = self.eta.total_left() if event.epoch + 1 < self.eta.epochs else 0.0
            timing = f" | took {duration(took)}" + (f", run ETA {duration(left)}" if left else "")
            self._line(f"epoch {epoch} {d['epoch_kind']}: val acc {d['accuracy']:.2f}% loss {d['loss']:.4f} "
                       f"rel BOPs {d['rel_bops']:.3f}% {within}{gate}{timing}")
        elif event.kind == "bad_batch":
            self._line(f"warning: non-finite loss, batch skipped ({d['count']} so far)")

    def _line(self, text: str) -> None:
        text = clean(f"{clock()} {self.prefix}{text}")
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            info(text)


def compress_summary(report: dict, run_dir: Any, notes: Iterable[str] = ()) -> None:
    c, b = report["cost"], report["budget"]
    lines = [f"run: {run_dir}",
             f"accuracy: float {report['accuracy']['float']:.2f}%  quantized {report['accuracy']['quantized']:.2f}%",
             f"cost: {c['bops']:,} BOPs ({c['rel_bops']:.3f}% of 32x32), weights {c['weight_bytes']:,.0f} bytes"]
    for name, limit in b.items():
        if limit is not None:
            lines.append(f"budget {name}: {limit:,.6g}  used {c[name]:,.6g} ({100 * c[name] / limit:.1f}%)")
    lines.append("within budget: " + ("yes" if report["feasible"] else "NO"))
    lines.extend(notes)
    show(*lines)


def export_summary(result: Any) -> None:
    q = result.qdq
    lines = [f"wrote {q.path} (opset {q.opset}, {q.size_bytes:,} bytes)"]
    if result.float is not None:
        f = result.float
        lines.append(f"wrote {f.path} (your float model as given, {f.size_bytes:,} bytes); QDQ file is "
                     f"{100 * q.size_bytes / f.size_bytes:.1f}% of it")
    if q.parity is not None:
        p = q.parity
        lines.append(f"parity with PyTorch on {result.parity_source}: top-1 agreement {p.agreement:.2f}%, "
                     f"max |logit diff| {p.max_abs_diff:.3g}")
        if p.file_agreement is not None:
            lines.append(f"warning: onnxruntime's fused integer kernels round differently from PyTorch on this model "
                         f"({p.agreement:.2f}% top-1 agreement); with graph optimizations off the file agrees on "
                         f"{p.file_agreement:.2f}%, max |logit diff| {p.file_max_abs_diff:.3g}")
    lines.append(f"BOPs read back from the file: {result.report_bops:,} (equal to report.json)")
    if q.kernels:
        fused = sum(f.integer for f in q.kernels)
        lines.append(f"integer kernels in onnxruntime: {fused} of {len(q.kernels)} ops the profile runs as integer"
                     + ("" if fused == len(q.kernels) else " (--allow-float-fallback: the others run in float)"))
    if result.latency_ms:
        lat = result.latency_ms
        line = f"onnxruntime latency (median, batch 1): QDQ {lat['qdq']:.3f} ms"
        if "float" in lat:
            line += f", float {lat['float']:.3f} ms, ratio {lat['ratio_qdq_over_float']:.2f}x"
        lines.append(line)
    show(*lines)


def verify_table(path: Any, result: Any, bops: float | None, weight_bytes: float | None, openvino: Any = None) -> None:
    rows = [(l.node, l.op, f"{l.macs:,}", f"{l.bits_w}/{l.bits_a}", f"{l.bops:,}", f"{l.weight_bytes:,.0f}", l.lint)
            for l in result.layers]
    columns = ["node", "op", "MACs", "bits w/a", "BOPs", "weight bytes", "onnxruntime CPU"]
    if openvino is not None:
        rows = [(*row, layer.text()) for row, layer in zip(rows, openvino.layers)]
        columns.append("OpenVINO CPU")
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
    show(table(f"{path} (opset {result.opset})", columns, rows, right=("MACs", "BOPs", "weight bytes")), *lines)
