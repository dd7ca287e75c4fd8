"""Every `cgmq ...` command in the README's console and bash blocks works exactly as printed.

The commands run in README order in one fresh directory (so `cgmq demo`, the
README's first command, makes the runs the later ones use) and each must exit
with the code the README shows (`; echo $?` followed by the code), else 0. A
command shown twice (the quick start and its section) runs once.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cgmq_cli.cli import app

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"^```(console|bash)\n(.*?)^```", re.S | re.M)


def readme_commands(text: str = README) -> list[tuple[list[str], int, str]]:
    """(arguments after `cgmq`, expected exit code, the line as printed) for every cgmq command in the blocks."""
    found = []
    for kind, body in BLOCK.findall(text):
        lines = body.replace("\\\n", " ").splitlines()
        for i, line in enumerate(lines):
            if kind == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            for part in re.split(r"\s*(?:&&|;)\s*", line.split(" #")[0]):
                words = shlex.split(part, comments=True)
                if not words or words[0] != "cgmq":
                    continue
                code = 0
                if "echo $?" in line:  # the code is the last line this command printed
                    output = []
                    for later in lines[i + 1:]:
                        if later.startswith("$ "):
                            break
                        output += [later] if later.strip() else []
                    code = int(output[-1])
                found.append((words[1:], code, part.strip()))
    return found


def test_the_parser_finds_the_commands() -> None:
    sample = "```console\n$ cgmq check --x 1; echo $?\nFAIL a\n4\n$ cgmq report\nok\n```\n" \
             "```bash\npip install -e . && cgmq demo   # comment\ntorchrun -m cgmq_cli compress x\n```\n"
    assert readme_commands(sample) == [(["check", "--x", "1"], 4, "cgmq check --x 1"), (["report"], 0, "cgmq report"),
                                       (["demo"], 0, "cgmq demo")]


def test_the_readme_opens_with_the_two_setup_commands() -> None:
    first = BLOCK.search(README)
    assert first.start() < README.index("## Install")
    lines = [l for l in first.group(2).splitlines() if l.strip() and not l.startswith("#")]
    assert [l.split("#")[0].strip() for l in lines] == ["pip install -e . && cgmq demo",
                                                        "pip install -e '.[dev]' && python -m pytest"]


@pytest.mark.slow
def test_every_readme_command_works_as_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = readme_commands()
    assert commands[0][0] == ["demo"] and len(commands) >= 15
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    done: list[list[str]] = []
    for args, code, printed in commands:
        if args in done:  # the same command shown in two places (quick start, its section) runs once
            continue
        done.append(args)
        result = runner.invoke(app, args)
        assert result.exit_code == code, (printed, result.exit_code, result.output[-2000:])
