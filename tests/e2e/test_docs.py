"""Every CLI command has help text and a README section; the README's commands are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cgmq_cli.cli import app

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
COMMANDS = sorted(typer.main.get_command(app).commands)
runner = CliRunner()


def test_command_list_is_complete() -> None:
    assert {"inspect", "profiles", "compress", "sweep", "report", "check", "export", "verify", "demo"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_command_has_help(name: str) -> None:
    command = typer.main.get_command(app).commands[name]
    assert (command.help or "").strip(), f"`cgmq {name}` has no help text"
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0 and "Usage: " in result.output
    for param in command.params:
        if param.param_type_name == "option" and param.name != "help":
            assert (param.help or "").strip(), f"`cgmq {name} {param.opts[0]}` has no help text"


@pytest.mark.parametrize("name", COMMANDS)
def test_command_has_readme_section(name: str) -> None:
    assert re.search(rf"^### `cgmq {name}\b", README, re.M), f"README has no section for `cgmq {name}`"


def test_readme_install_and_test_commands_are_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    opening = re.search(r"```bash\n(.+?)\n```", README, re.S).group(1)  # the README's first block
    assert "pip install -e '.[dev]' && python -m pytest" in opening
    assert "pip install -e '.[dev]'" in ci and re.search(r"^python -m pytest$", ci, re.M)
    install = re.search(r"## Install\s.*?```bash\n(.+?)\n```", README, re.S).group(1).strip().splitlines()
    assert install == ["pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu",
                       "pip install -e '.[dev]'"]  # the CPU-only torch first, for machines without a GPU
    tests = re.search(r"## Tests\s+```bash\n(.+?)\n```", README, re.S).group(1).strip()
    assert tests == "python -m pytest"


def test_readme_documents_every_exit_code_and_report_field() -> None:
    from cgmq_cli import errors

    for code in (errors.EXIT_OK, errors.EXIT_INTERNAL, errors.EXIT_BAD_INPUT, errors.EXIT_INFEASIBLE,
                 errors.EXIT_CHECK_FAILED, errors.EXIT_TRAINING_FAILED, errors.EXIT_INTERRUPTED):
        assert re.search(rf"^\| {code} \|", README, re.M), f"exit code {code} missing from the README"
    for field in ("budget", "cost", "feasible", "accuracy", "layers", "epochs", "seconds"):
        assert f"`{field}`" in README


def test_version() -> None:
    from cgmq_cli import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"cgmq {__version__}\n"
