"""The CLI's error boundary and click plumbing: every command runs inside :class:`CgmqGroup`.

Domain errors (:class:`CgmqError`) become ``error: <message>`` and an optional
``hint: ...`` on stderr with the kind's exit code; any other exception is an
internal error (exit 1); with ``--json`` one JSON object also goes to stdout.
SIGTERM behaves like Ctrl-C (:func:`terminate_as_interrupt`). ``CGMQ_DEBUG=1``
shows tracebacks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any, List

import typer
from typer.core import TyperCommand, TyperGroup

from cgmq_cli import render
from cgmq_cli.errors import (EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, SIGNALLED, CgmqError, InterruptedRun,
                             UsageError, is_interrupt, os_error)
from cgmq_cli.sanitize import clean


def debug_enabled() -> bool:
    return os.environ.get("CGMQ_DEBUG", "") not in ("", "0")


def _click_modules() -> list[Any]:
    """The click that typer runs on: typer >= 0.22 vendors its own (``typer._click``), older typer the package.

    The ``click`` package is imported only when typer has no vendored copy (it costs start-up time).
    """
    try:
        import typer._click.exceptions as vendored

        return [vendored] + ([sys.modules["click.exceptions"]] if "click.exceptions" in sys.modules else [])
    except ImportError:
        pass
    try:
        import click.exceptions
    except ImportError:
        return []
    return [click.exceptions]


def _click_flow() -> tuple[type[BaseException], ...]:
    """Exceptions that are click's control flow (usage errors, --help, exits): they pass the boundary."""
    flow: tuple[type[BaseException], ...] = (typer.Exit, typer.Abort)
    typer_exc = getattr(getattr(typer, "exceptions", None), "TyperException", None)
    if typer_exc is not None:
        flow += (typer_exc,)
    for module in _click_modules():
        flow += tuple(getattr(module, name) for name in ("Exit", "ClickException", "Abort") if hasattr(module, name))
    return flow


_CLICK_FLOW = _click_flow()


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """click's usage errors (bad or missing flags and values)."""
    return tuple(module.UsageError for module in _click_modules())


_USAGE_ERRORS = _usage_error_types()


def _quiet_after_interrupt() -> None:
    """After the first Ctrl-C / SIGTERM is handled, further ones must not interrupt the shutdown (atexit hooks)."""
    if not SIGNALLED["seen"]:
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            signal.signal(sig, signal.SIG_IGN)


def wants_json(args: List[str]) -> bool:
    """Whether the command line asks for JSON on stdout (``--json``, ``--format json``, ``--format=json``)."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg in ("--json", "--format=json") or (arg == "--format" and args[i + 1:i + 2] == ["json"]):
            return True
    return False


class _PlainCoercion:
    """typer's coercion of one ``str``/``int``/``float``/``bool``/``Path`` parameter (or a list of them), without pydantic.

    typer 0.2x coerces every parameter through a pydantic TypeAdapter; importing
    pydantic costs about 0.1 s of every command's start-up. For these plain
    types the result (and the error text) is the same; parameters of any other
    type, or a typer without this hook, keep typer's own coercion.
    """

    MESSAGES = {int: "Input should be a valid integer, unable to parse string as an integer",
                float: "Input should be a valid number, unable to parse string as a number"}
    BOOLEAN = {**dict.fromkeys(("1", "true", "t", "yes", "y", "on"), True),
               **dict.fromkeys(("0", "false", "f", "no", "n", "off"), False)}

    def __init__(self, kind: type) -> None:
        self.kind = kind

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        many = param.multiple or param.nargs == -1
        if value is None:
            return () if many else None
        if many:
            if isinstance(value, str):
                raise _bad_parameter("Value must be an iterable.", ctx, param)
            return [self._one(v, param, ctx) for v in value]
        return self._one(value, param, ctx)

    def _one(self, value: Any, param: Any, ctx: Any) -> Any:
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            word = str(value).strip().lower()
            if word in self.BOOLEAN:
                return self.BOOLEAN[word]
            raise _bad_parameter("Input should be a valid boolean, unable to interpret input", ctx, param)
        if isinstance(value, self.kind) and not isinstance(value, bool):
            return value
        try:
            return self.kind(value.strip() if self.kind in (int, float) and isinstance(value, str) else value)
        except (TypeError, ValueError, OverflowError):
            raise _bad_parameter(self.MESSAGES.get(self.kind, f"Value {value!r} is not a valid {self.kind.__name__}."),
                                 ctx, param) from None


def _bad_parameter(message: str, ctx: Any, param: Any) -> BaseException:
    for module in _click_modules():
        if hasattr(module, "BadParameter"):
            return module.BadParameter(message, ctx=ctx, param=param)
    return UsageError(message)


def _plain_param(param: Any) -> Any:
    import typing

    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if typing.get_origin(annotation) is list:
        annotation = (typing.get_args(annotation) or (None,))[0]
    if annotation in (str, int, float, bool, Path) and getattr(param, "_runtime_param", "absent") is None:
        param._runtime_param = _PlainCoercion(annotation)
    return param


def _plain_coercion(command: Any) -> Any:
    """Give ``command``'s plain-typed parameters (``--help`` too) :class:`_PlainCoercion`; others are left alone."""
    for param in getattr(command, "params", ()):
        _plain_param(param)
    original = getattr(command, "get_help_option", None)
    if original is not None and not getattr(original, "cgmq_plain", False):
        def get_help_option(ctx: Any) -> Any:
            return _plain_param(original(ctx))

        get_help_option.cgmq_plain = True  # type: ignore[attr-defined]
        command.get_help_option = get_help_option
    return command


class CgmqGroup(TyperGroup):
    """Runs every command inside the error boundary (also under CliRunner).

    CgmqError -> its one line and exit code; click usage errors -> one line, exit 2;
    OSError -> one line with the errno text, exit 2; sys.exit from user code -> exit 2
    (never one of cgmq's own codes); Ctrl-C -> exit 130; anything else is a bug (exit 1).
    With ``--json`` each of them also prints one JSON object on stdout.
    """

    def parse_args(self, ctx: typer.Context, args: List[str]) -> List[str]:
        ctx.meta["cgmq_json"] = wants_json(list(args))
        _plain_coercion(self)
        return super().parse_args(ctx, args)

    def get_command(self, ctx: typer.Context, name: str) -> Any:
        return _plain_coercion(super().get_command(ctx, name))

    def invoke(self, ctx: typer.Context) -> Any:
        with render.json_only_stdout() if ctx.meta.get("cgmq_json") else contextlib.nullcontext():
            return self._invoke(ctx)

    def _invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CgmqError as exc:
            if not isinstance(exc, InterruptedRun) and is_interrupt(exc):  # e.g. a DataError around the import
                self._interrupted(ctx)  # of a C extension that a signal broke
            if debug_enabled():
                raise
            if isinstance(exc, InterruptedRun):
                _quiet_after_interrupt()
            self._fail(ctx, exc.message, exc.hint, exc.exit_code, exc.result)
        except KeyboardInterrupt:
            self._interrupted(ctx)
        except _USAGE_ERRORS as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":
                raise
            command = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "cgmq"
            self._fail(ctx, exc.format_message(), f"see `{command} --help`", EXIT_BAD_INPUT)
        except _CLICK_FLOW:  # --help, exits: click/typer handle them
            raise
        except SystemExit as exc:  # only user code (an arch, loss or data file) calls sys.exit inside a command
            if debug_enabled():
                raise
            self._fail(ctx, f"code cgmq imported called sys.exit({exc.code!r})",
                       "an --arch, --loss or --data module must not exit", EXIT_BAD_INPUT)
        except OSError as exc:
            if is_interrupt(exc):
                self._interrupted(ctx)
            if debug_enabled():
                raise
            error = os_error(exc, action="read or write")
            self._fail(ctx, error.message, error.hint, EXIT_BAD_INPUT)
        except Exception as exc:
            if is_interrupt(exc):  # the interrupt surfaced as another error (raised inside a C extension)
                self._interrupted(ctx)
            if debug_enabled():
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            self._fail(ctx, f"internal error: {type(exc).__name__}: {first[:300]}",
                       "this is a bug in cgmq; rerun with CGMQ_DEBUG=1 for the traceback and report it", EXIT_INTERNAL)
        finally:
            SIGNALLED["seen"] = False  # this command's signal must not turn a later command's errors into interrupts

    def _interrupted(self, ctx: typer.Context) -> None:
        _quiet_after_interrupt()
        self._fail(ctx, "interrupted", None, EXIT_INTERRUPTED)

    @staticmethod
    def _fail(ctx: typer.Context, message: str, hint: str | None, code: int, result: dict | None = None) -> None:
        """The one place a failure is rendered: stderr lines always, one JSON object on stdout under --json."""
        render.error(message, hint)
        if ctx.meta.get("cgmq_json"):
            render.json_error(clean(message), clean(hint) if hint else None, code, result)
        ctx.exit(code)


class OptionalValue(TyperCommand):
    """A command whose options named in ``OPTIONAL`` may be given without a value (then they get "").

    ``cgmq export --onnx`` writes the default path; ``--onnx PATH`` that path.
    A following token that starts with ``-`` is the next option, not the value.
    """

    OPTIONAL = ("--onnx",)

    def parse_args(self, ctx: typer.Context, args: List[str]) -> List[str]:
        fixed: List[str] = []
        for i, arg in enumerate(args):
            if arg == "--":
                fixed.extend(args[i:])
                break
            bare = arg in self.OPTIONAL and (i + 1 == len(args) or args[i + 1].startswith("-"))
            fixed.append(f"{arg}=" if bare else arg)
        return super().parse_args(ctx, fixed)


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (CI cancel, kill) behaves like Ctrl-C: stop at once, keep the last checkpoint.

    Only the first signal interrupts; later ones (a double Ctrl-C) are ignored while
    cgmq cleans up and exits, so no traceback comes out of a cleanup or atexit hook.
    """
    interrupted = SIGNALLED["seen"] = False  # a signal of an earlier command in this process is not this one's

    def handler(signum, frame):  # noqa: ANN001
        nonlocal interrupted
        if interrupted:
            return
        interrupted = SIGNALLED["seen"] = True
        raise KeyboardInterrupt

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. some test runners)
            pass
    try:
        yield
    finally:
        if interrupted:
            _quiet_after_interrupt()
        else:
            for sig, old in previous.items():
                signal.signal(sig, old)
