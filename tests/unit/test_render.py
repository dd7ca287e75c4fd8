"""render.Grid writes rich's own text without rich; Eta's arithmetic; timestamped progress lines."""

from __future__ import annotations

import io
import re
import string

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from cgmq_cli import render
from cgmq_cli.render import Eta, Grid, TrainProgress
from cgmq_cli.trainer import Event


def _rich(grid: Grid, width: int = 200) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, highlight=False, markup=False, soft_wrap=True, no_color=True).print(grid.rich())
    return buf.getvalue()


TEXT = st.text(alphabet=string.ascii_letters + string.digits + " ,.%/-+_()*", max_size=14).map(str.strip)


@st.composite
def grids(draw) -> Grid:
    n = draw(st.integers(1, 6))
    columns = draw(st.lists(TEXT.filter(bool), min_size=n, max_size=n, unique=True))
    rows = draw(st.lists(st.lists(TEXT, min_size=n, max_size=n).map(tuple), min_size=1, max_size=5))
    right = draw(st.sets(st.sampled_from(columns)))
    title = draw(TEXT)
    return Grid(title, tuple(columns), tuple(rows), frozenset(right))


@settings(max_examples=150, deadline=None)
@given(grids(), st.integers(20, 200))
def test_plain_is_riches_text_or_declines(grid: Grid, width: int) -> None:
    plain = grid.plain(width)
    if plain is not None:
        assert plain + "\n" == _rich(grid, width)


def test_plain_declines_what_only_rich_can_draw() -> None:
    base = Grid("t", ("a", "b"), (("1", "2"),))
    assert base.plain(200) is not None
    assert Grid("t", ("a", "b"), ()).plain(200) is None  # no rows
    assert Grid("t", ("a", "a"), (("1", "2"),)).plain(200) is None  # repeated column
    assert Grid("t", ("a", "b"), (("ü", "2"),)).plain(200) is None  # not ASCII (cell widths)
    assert Grid("a title longer than the table", ("a", "b"), (("1", "2"),)).plain(200) is None  # rich wraps it
    assert Grid("t", ("a", "b"), (("1" * 50, "2"),)).plain(40) is None  # wider than the console


def test_show_writes_plain_text_into_a_pipe(capsys) -> None:
    render.show(Grid("run r", ("layer", "MACs"), (("conv1", "1,000"),), frozenset({"MACs"})), "total: 1 layer")
    assert capsys.readouterr().out.splitlines() == [
        "run r", "┏━━━━━━━┳━━━━━━━┓", "┃ layer ┃  MACs ┃", "┡━━━━━━━╇━━━━━━━┩", "│ conv1 │ 1,000 │",
        "└───────┴───────┘", "total: 1 layer"]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_eta_projects_the_epoch_and_the_run() -> None:
    clock = Clock()
    eta = Eta(["gate", "weight", "gate", "weight"], now=clock)
    eta.start(0, 4, "gate")
    assert eta.epoch_left() is None and eta.total_left() is None  # nothing measured yet
    clock.t = 5.0
    eta.step(5, 10)  # half of the gate epoch in 5 s
    assert eta.epoch_left() == 5.0
    assert eta.total_left() == 5.0 + 3 * 10.0  # the later epochs as long as this one is projected to be
    clock.t = 10.0
    assert eta.end() == 10.0
    eta.start(1, 4, "weight")
    clock.t = 11.0
    eta.step(1, 2)  # a weight epoch takes 2 s
    assert eta.epoch_left() == 1.0
    # later: a gate epoch (mean of the finished gate epochs, 10 s) and a weight epoch (no weight epoch finished:
    # the mean of all finished epochs, 10 s)
    assert eta.total_left() == 1.0 + 10.0 + 10.0
    assert eta.text() == "epoch ETA 0:01, run ETA 0:21"


def test_duration() -> None:
    assert [render.duration(s) for s in (0, 59.4, 83.2, 4000)] == ["0:00", "0:59", "1:23", "1:06:40"]


def test_plain_progress_lines_have_a_timestamp_and_an_eta(capsys) -> None:
    progress = TrainProgress(schedule=["gate", "weight"])
    progress(Event("epoch_start", 0, {"epoch_kind": "gate", "epochs": 2}))
    progress(Event("progress", 0, {"phase": "gate", "step": 1, "steps": 4, "loss": 0.5, "load": 2.0, "rel_bops": 4.0}))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(r"\d\d:\d\d:\d\d epoch 1 gate step 1/4 loss 0\.5000 cost/budget 2\.000 rel_bops 4\.000% "
                        r"\| epoch ETA \d+:\d\d, run ETA \d+:\d\d", lines[0]), lines[0]


def test_export_summary_warns_when_the_fused_kernels_fall_short_and_says_what_the_file_means(capsys) -> None:
    from types import SimpleNamespace

    from cgmq_cli.export.verify import ParityResult

    def summary(parity: ParityResult) -> str:
        qdq = SimpleNamespace(path="m.onnx", opset=25, size_bytes=1000, parity=parity, kernels=())
        render.export_summary(SimpleNamespace(qdq=qdq, float=None, parity_source="360 validation images",
                                              report_bops=10, latency_ms=None))
        return capsys.readouterr().out

    assert "warning" not in summary(ParityResult(100.0, 1e-6, 1e-7, 360))
    text = summary(ParityResult(99.72, 0.6, 0.1, 360, file_agreement=100.0, file_max_abs_diff=4e-6))
    assert "top-1 agreement 99.72%" in text
    assert "warning: onnxruntime's fused integer kernels round differently" in text and "agrees on 100.00%" in text
