"""Every bad model input gives one `error:` line (plus an optional `hint:`), no traceback, exit 2.

Also: untrusted pickles never run code, a .pt2 loads and inspects, --version and --help.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import uuid
from pathlib import Path

import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

from cgmq_cli import __version__
from cgmq_cli.cli import app
from cgmq_cli.errors import EXIT_BAD_INPUT
from cgmq_cli.models import LeNet5

runner = CliRunner()
FIXTURES = Path(__file__).parent / "fixtures"
UNTRACEABLE = f"{FIXTURES / 'untraceable.py'}:UntraceableNet"
LENET = "cgmq_cli.models:LeNet5"
LENET_MACS = 460800 + 3276800 + 524288 + 5120


def _inspect(*args: str):
    return runner.invoke(app, ["inspect", *args])


def assert_bad_input(result, *needles: str) -> None:
    """Exit 2, stderr = `error: ...` [+ `hint: ...`], nothing on stdout, no traceback."""
    assert result.exit_code == EXIT_BAD_INPUT, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert 1 <= len(lines) <= 2, lines
    assert lines[0].startswith("error: "), lines
    assert len(lines) == 1 or lines[1].startswith("hint: "), lines
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert result.stdout == ""
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


@pytest.fixture(scope="module")
def lenet_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sd") / "lenet.pt"
    torch.save(LeNet5().state_dict(), path)
    return path


# ------------------------------------------------------------ bad files ---


def test_missing_file(tmp_path: Path) -> None:
    assert_bad_input(_inspect(str(tmp_path / "nope.pt")), "not found", "nope.pt")


def test_directory(tmp_path: Path) -> None:
    assert_bad_input(_inspect(str(tmp_path)), "is a directory")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.touch()
    assert_bad_input(_inspect(str(path), "--arch", LENET), "empty")


@pytest.mark.parametrize("content", [os.urandom(4096), b"hello, this is a text file\n" * 10, b"PK\x03\x04garbage"])
def test_garbage_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    result = _inspect(str(path), "--arch", LENET)
    assert_bad_input(result, "not a readable PyTorch checkpoint")
    assert "--trust-checkpoint" not in result.stderr  # garbage is not an untrusted pickle


def test_truncated_checkpoint(tmp_path: Path, lenet_state: Path) -> None:
    data = lenet_state.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    assert_bad_input(_inspect(str(path), "--arch", LENET), "not a readable PyTorch checkpoint")


# ---------------------------------------------------------- untrusted pickles ---


class _MakesMarker:
    """Unpickling this calls os.makedirs(marker): proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_reduce_payload_is_not_run_without_trust(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _MakesMarker(marker)}, path)
    result = _inspect(str(path), "--input-shape", "1,3,8,8")
    assert_bad_input(result, "pickled Python object", "--trust-checkpoint")
    assert not marker.exists()
    # control: the payload does run once the user trusts the file (then it is not a model)
    result = _inspect(str(path), "--input-shape", "1,3,8,8", "--trust-checkpoint")
    assert marker.exists()
    assert_bad_input(result, "not a state_dict or model")


def test_whole_module_pickle_refused_without_trust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pickled nn.Module whose class lives in a module with an import side effect."""
    name = f"cgmq_sidefx_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(
        "import pathlib\nimport torch\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(3, 4, 3)\n"
        "    def forward(self, x):\n"
        "        return self.conv(x)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    path = tmp_path / "whole.pt"
    torch.save(module.Net(), path)
    marker.unlink()
    del sys.modules[name]

    result = _inspect(str(path), "--input-shape", "1,3,8,8")
    assert_bad_input(result, "pickled Python object", f"{name}.Net", "--trust-checkpoint")
    assert not marker.exists(), "the checkpoint's module was imported without --trust-checkpoint"
    # control: trusting the file imports the module (so the marker does detect code running)
    result = _inspect(str(path), "--input-shape", "1,3,8,8", "--trust-checkpoint", "--json")
    assert result.exit_code == 0, result.output
    assert marker.exists()
    sys.modules.pop(name, None)


def test_plain_module_pickle_with_trust(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 100, 5)), path)
    assert_bad_input(_inspect(str(path), "--input-shape", "1,3,10,10"), "torch.nn.modules.container.Sequential")
    result = _inspect(str(path), "--input-shape", "1,3,10,10", "--trust-checkpoint", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [layer["macs"] for layer in data["layers"]] == [21600, 4000]


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")
def test_torchscript_not_supported(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.script(LeNet5()).save(str(path))
    result = _inspect(str(path), "--input-shape", "1,1,28,28")
    assert_bad_input(result, "TorchScript", "not support", "state_dict", ".pt2")


# -------------------------------------------------------- state_dict + --arch ---


def test_state_dict_without_arch(lenet_state: Path) -> None:
    assert_bad_input(_inspect(str(lenet_state), "--input-shape", "1,1,28,28"), "state_dict", "--arch")


def test_arch_unknown_module(lenet_state: Path) -> None:
    assert_bad_input(_inspect(str(lenet_state), "--arch", "no_such_package_cgmq:Net"),
                     "--arch no_such_package_cgmq:Net", "cannot import")


def test_arch_unknown_attribute(lenet_state: Path) -> None:
    result = _inspect(str(lenet_state), "--arch", "cgmq_cli.models:LeNet6")
    assert_bad_input(result, "has no attribute LeNet6", "cgmq_cli.models:LeNet5")


def test_arch_missing_file(lenet_state: Path, tmp_path: Path) -> None:
    assert_bad_input(_inspect(str(lenet_state), "--arch", f"{tmp_path / 'nope.py'}:Net"), "not found")


def test_arch_malformed(lenet_state: Path) -> None:
    assert_bad_input(_inspect(str(lenet_state), "--arch", "LeNet5"), "expected package.module:Name")


def test_arch_shape_mismatch_names_first_key(tmp_path: Path) -> None:
    path = tmp_path / "lenet7.pt"
    torch.save(LeNet5(num_classes=7).state_dict(), path)
    result = _inspect(str(path), "--arch", LENET, "--input-shape", "1,1,28,28")
    assert_bad_input(result, "'classifier.3.weight'", "(7, 512)", "(10, 512)")


def test_arch_wrong_model_unexpected_key(lenet_state: Path) -> None:
    result = _inspect(str(lenet_state), "--arch", "cgmq_cli.models:DigitsCNN", "--input-shape", "1,1,8,8")
    assert_bad_input(result, "does not fit the architecture")


def test_state_dict_with_arch_works(lenet_state: Path) -> None:
    result = _inspect(str(lenet_state), "--arch", LENET, "--input-shape", "1,1,28,28", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["totals"]["macs"] == LENET_MACS


# ---------------------------------------------------------------- tracing ---


@pytest.fixture(scope="module")
def untraceable_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.spec_from_file_location("cgmq_test_untraceable", FIXTURES / "untraceable.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path_factory.mktemp("untraceable") / "net.pt"
    torch.save(module.UntraceableNet().state_dict(), path)
    return path


def test_untraceable_model_suggests_leaf(untraceable_state: Path) -> None:
    result = _inspect(str(untraceable_state), "--arch", UNTRACEABLE, "--input-shape", "1,3,8,8")
    assert_bad_input(result, "`gate`", "data-dependent control flow", "--leaf gate")
    ok = _inspect(str(untraceable_state), "--arch", UNTRACEABLE, "--input-shape", "1,3,8,8", "--leaf", "gate", "--json")
    assert ok.exit_code == 0, ok.output
    assert [layer["name"] for layer in json.loads(ok.stdout)["layers"]] == ["stem", "head"]


def test_leaf_naming_nonexistent_module(untraceable_state: Path) -> None:
    result = _inspect(str(untraceable_state), "--arch", UNTRACEABLE, "--input-shape", "1,3,8,8", "--leaf", "gaet")
    assert_bad_input(result, "--leaf gaet", "no submodule", "gate")


# ------------------------------------------------------------ input shape ---


@pytest.mark.parametrize("shape", ["abc", "0,1,28,28", "28", "1,1,-28,28", "1,1,28.5,28", ""])
def test_bad_input_shape(lenet_state: Path, shape: str) -> None:
    assert_bad_input(_inspect(str(lenet_state), "--arch", LENET, "--input-shape", shape), "--input-shape")


def test_input_shape_the_model_rejects(lenet_state: Path) -> None:
    result = _inspect(str(lenet_state), "--arch", LENET, "--input-shape", "1,1,5,5")
    assert_bad_input(result, "does not accept inputs of shape (1, 1, 5, 5)", "--input-shape")


def test_unknown_input_shape(lenet_state: Path) -> None:
    assert_bad_input(_inspect(str(lenet_state), "--arch", LENET), "input shape is unknown", "--input-shape")


# --------------------------------------------------------------------- .pt2 ---


def test_pt2_loads_and_inspects(tmp_path: Path) -> None:
    path = tmp_path / "lenet.pt2"
    program = torch.export.export(LeNet5().eval(), (torch.randn(1, 1, 28, 28),))
    torch.export.save(program, str(path))
    result = _inspect(str(path), "--json")  # the input shape comes from the program
    assert result.exit_code == 0, (result.output, result.exception)
    data = json.loads(result.stdout)
    assert data["totals"]["macs"] == LENET_MACS
    assert [(layer["name"], layer["macs"]) for layer in data["layers"]] == [
        ("features.0", 460800), ("features.3", 3276800), ("classifier.1", 524288), ("classifier.3", 5120)]


def test_corrupt_pt2(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt2"
    path.write_bytes(b"not an exported program")
    assert_bad_input(_inspect(str(path)), "not a loadable torch.export program")


# ---------------------------------------------------------- version and help ---


@pytest.mark.parametrize("args, needle", [
    (["inspect"], "no model given"),  # MODEL may come from cgmq.yaml
    (["inspect", "torchvision:resnet18", "--bogus"], "No such option"),
    (["inspect", "torchvision:resnet18", "--input-shape"], "requires an argument"),
    (["no-such-command"], "No such command"),
])
def test_click_usage_errors_are_not_internal_errors(args, needle: str) -> None:
    """Usage errors keep click's own message and exit 2 (typer's vendored click included)."""
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert needle in result.stderr
    assert "internal error" not in result.output and "Traceback" not in result.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"cgmq {__version__}"
    assert __version__ and __version__[0].isdigit()


def test_every_command_has_help() -> None:
    group = typer.main.get_command(app)  # typer may vendor its own click: no isinstance checks
    names = sorted(group.commands)
    assert {"inspect", "compress", "profiles"} <= set(names)
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    for name in names:
        command = group.commands[name]
        assert command.help and command.help.strip(), name
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        flat = " ".join(result.stdout.split())
        assert " ".join(command.help.split()[:5]) in flat, name
        assert name in " ".join(top.stdout.split())
        for param in command.params:
            if param.param_type_name == "option" and not getattr(param, "hidden", False) and "--help" not in param.opts:
                assert param.help and param.help.strip(), (name, param.opts)
