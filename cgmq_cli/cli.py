"""Typer app: arguments -> api -> rendering. The one error boundary.

Domain errors (:class:`CgmqError`) become ``error: <message>`` and an optional
``hint: ...`` on stderr with the kind's exit code; any other exception is an
internal error (exit 1). Set ``CGMQ_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, List, Optional

import click
import typer
from typer.core import TyperGroup

from cgmq_cli import __version__, api
from cgmq_cli.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, CgmqError
from cgmq_cli import render


def debug_enabled() -> bool:
    return os.environ.get("CGMQ_DEBUG", "") not in ("", "0")


class CgmqGroup(TyperGroup):
    """Runs every command inside the error boundary (also under CliRunner)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CgmqError as exc:
            if debug_enabled():
                raise
            render.error(exc.message, exc.hint)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            render.error("interrupted")
            ctx.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as exc:
            if debug_enabled():
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            render.error(f"internal error: {type(exc).__name__}: {first}",
                         "this is a bug in cgmq; rerun with CGMQ_DEBUG=1 for the traceback and report it")
            ctx.exit(EXIT_INTERNAL)


app = typer.Typer(
    cls=CgmqGroup,
    help="Compress PyTorch models to mixed precision under a hard hardware budget (CGMQ).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cgmq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Compress PyTorch models to mixed precision under a hard hardware budget (CGMQ)."""


# Options shared by every command that takes MODEL.
ArchOpt = typer.Option(None, "--arch", help="Architecture for a state_dict: package.module:Name, path/to/file.py:Name or torchvision:NAME.")
TrustOpt = typer.Option(False, "--trust-checkpoint", help="Allow unpickling a whole saved nn.Module (runs code from the file: only for files you trust).")
LeafOpt = typer.Option(None, "--leaf", help="Keep this submodule untraced (repeatable), e.g. for data-dependent control flow.")
ShapeOpt = typer.Option(None, "--input-shape", help="Example input shape with batch first, e.g. 1,3,224,224.")
ProfileOpt = typer.Option(None, "--profile", help="Hardware profile: a preset name (see `cgmq profiles`) or a YAML file.")


def model_request(model: str, arch: Optional[str], trust: bool, leaf: Optional[List[str]], input_shape: Optional[str]) -> api.ModelRequest:
    return api.ModelRequest(model=model, arch=arch, trust=trust, leaves=tuple(leaf or ()), input_shape=api.parse_shape(input_shape))


@app.command()
def inspect(
    model: str = typer.Argument(..., help="Model file (.pt2, state_dict, trusted pickle) or torchvision:NAME."),
    arch: Optional[str] = ArchOpt,
    input_shape: Optional[str] = ShapeOpt,
    leaf: Optional[List[str]] = LeafOpt,
    trust_checkpoint: bool = TrustOpt,
    profile: Optional[str] = ProfileOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout instead of a table."),
) -> None:
    """List the quantizable layers of a model with MACs, parameters and totals."""
    result = api.inspect(model_request(model, arch, trust_checkpoint, leaf, input_shape), profile)
    if as_json:
        render.json_out(result.as_dict())
    else:
        render.inspect_table(result)


@app.command()
def profiles(as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout.")) -> None:
    """List the hardware profiles shipped in presets/."""
    from cgmq_cli.profiles import list_presets

    rows = [{"name": p.name, "description": p.description, "weight_bits": list(p.weight_bits),
             "act_bits": list(p.act_bits), "input_bits": p.input_bits,
             "cost": "table" if p.cost_table else "bops"} for p in list_presets()]
    if as_json:
        render.json_out({"profiles": rows})
    else:
        render.profiles_table(rows)


def main() -> None:
    """Console-script entry point."""
    app()
