"""A real Ctrl-C / SIGTERM whose KeyboardInterrupt a C extension turns into another error is still an interrupt.

A CI run caught ``cgmq export`` in onnxruntime's import when SIGTERM came: the handler's KeyboardInterrupt came
out as ``ImportError: initialization failed`` and cgmq printed "internal error" with exit 1 instead of exit 130.
"""

from __future__ import annotations

import signal

import pytest
import typer
from typer.testing import CliRunner

from cgmq_cli import errors
from cgmq_cli.boundary import CgmqGroup, terminate_as_interrupt

app = typer.Typer(cls=CgmqGroup)


@app.command()
def work(signalled: bool = False) -> None:
    with terminate_as_interrupt():
        if signalled:  # what the signal handler records before it raises KeyboardInterrupt
            errors.SIGNALLED["seen"] = True
        raise ImportError("initialization failed")


@app.command()
def other() -> None:
    pass


@pytest.fixture(autouse=True)
def _signals_back():
    """After an interrupt cgmq ignores further signals for its shutdown; give pytest its handlers back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    errors.SIGNALLED["seen"] = False


def test_an_error_raised_after_a_real_signal_exits_as_interrupted() -> None:
    result = CliRunner().invoke(app, ["work", "--signalled"])
    assert result.exit_code == errors.EXIT_INTERRUPTED, result.output
    assert "interrupted" in result.output and "internal error" not in result.output


def test_without_a_signal_the_same_error_is_a_bug_and_an_earlier_signal_does_not_count() -> None:
    CliRunner().invoke(app, ["work", "--signalled"])
    result = CliRunner().invoke(app, ["work"])  # a later command in the same process, no signal this time
    assert result.exit_code == errors.EXIT_INTERNAL, result.output
    assert "internal error: ImportError: initialization failed" in result.output


def test_compress_interrupted_inside_a_c_extension_keeps_its_checkpoint_and_says_how_to_resume(
        digits_ckpt: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cgmq_cli import api
    from cgmq_cli.trainer import Trainer

    def run(self, save=None):  # one epoch is saved, then SIGTERM lands inside a C extension
        self.state.epoch = 1
        save(self.state)
        errors.SIGNALLED["seen"] = True
        raise ImportError("initialization failed")

    monkeypatch.setattr(Trainer, "run", run)
    settings = api.settings(digits_ckpt, arch="cgmq_cli.models:DigitsCNN", data="digits", budget_rel_bops=3,
                            out=str(tmp_path / "run"), epochs=2, subset=128)
    with pytest.raises(errors.InterruptedRun) as caught:
        api.compress(settings)
    assert caught.value.hint == f"continue with: cgmq compress --resume {tmp_path / 'run'}"
    assert (tmp_path / "run" / "config.json").is_file() and "epoch 1" in caught.value.message


@app.command()
def wrapped(kind: str) -> None:
    """A signal inside a C extension that cgmq's own code then reports as bad input or a file error."""
    from cgmq_cli.errors import DataError

    with terminate_as_interrupt():
        errors.SIGNALLED["seen"] = True
        if kind == "data":
            raise DataError("--data x.py:fn: fn() raised ImportError: initialization failed")
        raise OSError(5, "Input/output error")


@pytest.mark.parametrize("kind", ["data", "os"])
def test_an_interrupt_wrapped_in_a_cgmq_or_os_error_is_still_an_interrupt_and_forgotten_afterwards(kind: str) -> None:
    result = CliRunner().invoke(app, ["wrapped", kind])
    assert result.exit_code == errors.EXIT_INTERRUPTED, result.output
    assert "interrupted" in result.output and "initialization" not in result.output
    assert not errors.SIGNALLED["seen"]  # a later call in this process (the API, a notebook) starts clean


def test_compress_interrupted_after_training_while_writing_the_model_resumes_to_a_finished_run(
        digits_ckpt: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cgmq_cli import api, compress

    real = compress.save_model
    monkeypatch.setattr(compress, "save_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    settings = api.settings(digits_ckpt, arch="cgmq_cli.models:DigitsCNN", data="digits", budget_rel_bops=3,
                            out=str(tmp_path / "run"), epochs=2, subset=128, gate_steps=5)
    with pytest.raises(errors.InterruptedRun) as caught:
        api.compress(settings)
    assert caught.value.hint == f"continue with: cgmq compress --resume {tmp_path / 'run'}"
    assert not (tmp_path / "run" / "model.pt").exists() and "epoch 2" in caught.value.message
    monkeypatch.setattr(compress, "save_model", real)
    result = api.resume(tmp_path / "run")
    assert result.report["epochs"] == 2 and (tmp_path / "run" / "model.pt").is_file()
