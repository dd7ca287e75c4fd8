"""A finished digits run, made once per session; tests that change a run work on a copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cli_helpers import ARCH, FAST, NO_INT8, cli


@pytest.fixture(scope="session")
def finished_run(digits_ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "runs" / "base"
    result = cli("compress", digits_ckpt, "--arch", ARCH, *FAST, *NO_INT8, "--budget-rel-bops", "5", "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run (a moved directory: code it names would need --trust-checkpoint)."""
    target = tmp_path / "runs" / "r"
    shutil.copytree(finished_run, target, symlinks=True)
    return target
