"""Issue 13, classes 1-4: no code runs from a file the user did not trust on this command line.

(1) tampered .pt2 archives, (2) trust and code named by a run directory,
(3) YAML bounds and echoed values, (4) control characters and bidi marks in every output.
Every payload creates a marker file; the tests assert it never appears.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import time
import zipfile
from pathlib import Path

import pytest
import torch

from cgmq_cli.errors import EXIT_BAD_INPUT
from cgmq_cli.models import DigitsCNN
from cli_helpers import ARCH, FAST, cli, one_line_error


class Payload:
    """Unpickling this creates ``marker`` (the stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.fixture(scope="module")
def genuine_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DigitsCNN saved by torch.export.save with a dynamic batch dimension."""
    program = torch.export.export(DigitsCNN().eval(), (torch.randn(4, 1, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path_factory.mktemp("pt2") / "digits.pt2"
    torch.export.save(program, str(path))
    return path


def tamper(src: Path, dst: Path, kind: str, marker: Path) -> Path:
    """A copy of a genuine archive with a payload where torch.export.load would execute it."""
    zin = zipfile.ZipFile(src)
    root = zin.namelist()[0].split("/")[0] + "/"
    entries = {i.filename[len(root):]: zin.read(i) for i in zin.infolist()}
    payload = pickle_bytes(Payload(marker))
    if kind == "weights":  # a weight marked use_pickle: torch.load(weights_only=False) on its bytes
        config = json.loads(entries["data/weights/model_weights_config.json"])
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        entries["data/weights/" + first["path_name"]] = payload
        entries["data/weights/model_weights_config.json"] = json.dumps(config).encode()
    elif kind == "sample_inputs":  # torch retries a failed weights-only load with weights_only=False
        entries["data/sample_inputs/model.pt"] = payload
    elif kind == "constants":  # an "opaque object" constant: plain pickle.loads
        config = json.loads(entries["data/constants/model_constants_config.json"])
        config["config"]["c"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
        entries["data/constants/model_constants_config.json"] = json.dumps(config).encode()
        entries["data/constants/opaque_obj_0"] = payload
    else:
        program = json.loads(entries["models/model.json"])
        code = f"open({str(marker)!r}, 'w')"
        if kind == "shape_expression":  # sympy.sympify evaluates the string
            program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0] = {
                "as_expr": {"expr_str": code, "hint": {"as_int": 4}}}
        elif kind == "guard":  # exec'd into the module's guard function
            program["guards_code"] = [f"{code} is None"]
        elif kind == "operator":  # a graph node calling an arbitrary torch function
            program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.load"
        entries["models/model.json"] = json.dumps(program).encode()
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for rel, data in entries.items():
            out.writestr(root + rel, data)
    return dst


def pickle_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


KINDS = ["weights", "sample_inputs", "constants", "shape_expression", "guard", "operator"]


# -- (1) tampered .pt2 ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["weights", "sample_inputs"])
def test_the_payloads_are_real(genuine_pt2: Path, tmp_path: Path, kind: str) -> None:
    """torch.export.load itself runs these payloads: the refusals below are not vacuous."""
    marker = tmp_path / "ran"
    path = tamper(genuine_pt2, tmp_path / "t.pt2", kind, marker)
    try:
        torch.export.load(str(path))
    except Exception:  # noqa: BLE001 - the program is broken after the payload ran; only the marker matters
        pass
    assert marker.exists()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["inspect", "compress"])
def test_tampered_pt2_is_refused_without_running_it(genuine_pt2: Path, tmp_path: Path, kind: str, command: str) -> None:
    marker = tmp_path / "ran"
    path = tamper(genuine_pt2, tmp_path / "t.pt2", kind, marker)
    args = [command, path] + ([*FAST, "--budget-rel-bops", "5", "--out", tmp_path / "run"] if command == "compress" else [])
    one_line_error(cli(*args), EXIT_BAD_INPUT, str(path), "--trust-checkpoint")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_genuine_pt2_still_loads(genuine_pt2: Path) -> None:
    result = cli("inspect", genuine_pt2, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["totals"]["macs"] == 337536


def test_trust_flag_is_the_only_gate(genuine_pt2: Path, tmp_path: Path) -> None:
    """With --trust-checkpoint the user vouches for the file: torch loads it as it is."""
    marker = tmp_path / "ran"
    path = tamper(genuine_pt2, tmp_path / "t.pt2", "weights", marker)
    result = cli("inspect", path, "--trust-checkpoint")
    assert marker.exists() and "Traceback" not in result.output


def _point_source(run: Path, model: Path, kind: str, trusted: bool = True) -> None:
    """Edit a run's config.json to say it was made from ``model`` (with a matching checksum)."""
    config = json.loads((run / "config.json").read_text())
    config["source"].update(model=str(model), kind=kind, arch=None, trusted=trusted,
                            sha256=hashlib.sha256(model.read_bytes()).hexdigest())
    config["settings"].update(model=str(model), arch=None, trust=True)
    (run / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("kind", ["weights", "sample_inputs"])
def test_export_of_a_run_from_a_tampered_pt2(run_copy: Path, genuine_pt2: Path, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "ran"
    path = tamper(genuine_pt2, tmp_path / "t.pt2", kind, marker)
    _point_source(run_copy, path, "pt2")
    one_line_error(cli("export", run_copy), EXIT_BAD_INPUT, "--trust-checkpoint")
    assert not marker.exists() and not (run_copy / "model.onnx").exists()


# -- (2) trust comes from the command line, never from a run directory ---------------------------


def test_config_json_cannot_grant_trust(run_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    pickled = tmp_path / "model.pt"
    torch.save(Payload(marker), pickled)
    _point_source(run_copy, pickled, "pickle", trusted=True)  # "trusted": true, written into the file
    one_line_error(cli("export", run_copy), EXIT_BAD_INPUT, "pickled module", "--trust-checkpoint")
    (run_copy / "report.json").unlink()
    (run_copy / "model.pt").unlink()  # an unfinished run: --resume must not trust it either
    one_line_error(cli("compress", "--resume", run_copy), EXIT_BAD_INPUT, "--trust-checkpoint")
    assert not marker.exists()


def _with_user_arch(run: Path, tmp_path: Path, body: str) -> tuple[Path, Path]:
    """Edit a run to name an arch file that creates a marker when imported."""
    marker = tmp_path / "imported"
    arch = tmp_path / "userarch.py"
    arch.write_text(f"open({str(marker)!r}, 'w').close()\n{body}\n")
    config = json.loads((run / "config.json").read_text())
    config["settings"]["arch"] = config["source"]["arch"] = f"{arch}:Net"
    (run / "config.json").write_text(json.dumps(config))
    return arch, marker


def test_code_named_by_a_moved_run_needs_trust(run_copy: Path, tmp_path: Path) -> None:
    _, marker = _with_user_arch(run_copy, tmp_path, "from torch import nn\nNet = lambda: nn.Linear(1, 1)")
    one_line_error(cli("export", run_copy), EXIT_BAD_INPUT, "moved or copied", "userarch.py:Net", "--trust-checkpoint")
    assert not marker.exists()
    trusted = cli("export", run_copy, "--trust-checkpoint")  # imported now (it does not fit: exit 2 after the import)
    one_line_error(trusted, EXIT_BAD_INPUT, "does not accept inputs")
    assert marker.exists() and "note: importing code named in the run's config.json: --arch" in trusted.stderr


def test_code_named_by_a_run_of_another_user_needs_trust(run_copy: Path, tmp_path: Path) -> None:
    _, marker = _with_user_arch(run_copy, tmp_path, "from cgmq_cli.models import DigitsCNN as Net")
    marker_file = run_copy / ".cgmq-run"
    data = json.loads(marker_file.read_text())
    data["path"] = str(run_copy.resolve())  # made here...
    marker_file.write_text(json.dumps(data))
    if hasattr(os, "getuid") and os.getuid() == 0:
        os.chown(run_copy / "config.json", 54321, -1)  # ...but config.json belongs to someone else
        reason = "belongs to another user"
    else:
        os.chmod(run_copy / "config.json", 0o666)
        reason = "other users can write"
    one_line_error(cli("export", run_copy), EXIT_BAD_INPUT, reason)
    assert not marker.exists()


def test_own_unmoved_run_imports_its_code_and_says_so(run_copy: Path, tmp_path: Path) -> None:
    _, marker = _with_user_arch(run_copy, tmp_path, "from cgmq_cli.models import DigitsCNN as Net")
    marker_file = run_copy / ".cgmq-run"
    data = json.loads(marker_file.read_text())
    data["path"] = str(run_copy.resolve())  # as if compress had written it here
    marker_file.write_text(json.dumps(data))
    result = cli("export", run_copy)
    assert result.exit_code == 0, result.output
    assert marker.exists() and (run_copy / "model.onnx").is_file()
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: importing code")]
    assert len(notes) == 1 and "userarch.py:Net" in notes[0]


# -- (3) YAML bounds ---------------------------------------------------------------------------------


def alias_bomb() -> str:
    lines = ["schema_version: 1", "weight_bits: [8]", "act_bits: [8]", 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_profile_fails_fast(tmp_path: Path) -> None:
    profile = tmp_path / "bomb.yaml"
    profile.write_text(alias_bomb())
    assert profile.stat().st_size < 400
    started = time.perf_counter()
    line = one_line_error(cli("inspect", "torchvision:resnet18", "--profile", profile), EXIT_BAD_INPUT, "aliases")
    assert time.perf_counter() - started < 1.0 and len(line) < 200


def test_alias_bomb_project_file_fails_fast(digits_ckpt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cgmq.yaml").write_text(alias_bomb().replace("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\n", ""))
    started = time.perf_counter()
    one_line_error(cli("compress", digits_ckpt, "--arch", ARCH, *FAST, "--budget-rel-bops", "5"), EXIT_BAD_INPUT,
                   "cgmq.yaml", "aliases")
    assert time.perf_counter() - started < 1.0 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text, needle", [
    ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\ndescription: " + "[" * 50 + "]" * 50 + "\n", "nested deeper"),
    ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\ndescription: " + "x" * 70_000 + "\n", "at most 65,536"),
    ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\nbudgets: {bops: " + "9" * 5000 + "}\n", "invalid YAML"),
])
def test_profile_bounds(tmp_path: Path, text: str, needle: str) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(text)
    one_line_error(cli("inspect", "torchvision:resnet18", "--profile", profile), EXIT_BAD_INPUT, needle)


def test_a_few_aliases_are_fine(tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("schema_version: 1\nweight_bits: &w [4, 8]\nact_bits: *w\n")
    assert cli("inspect", "torchvision:resnet18", "--profile", profile).exit_code == 0


def test_profile_that_is_not_a_regular_file(tmp_path: Path) -> None:
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    one_line_error(cli("inspect", "torchvision:resnet18", "--profile", "/dev/zero"), EXIT_BAD_INPUT,
                   "not a regular file")


def test_echoed_values_are_short(tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(f"schema_version: 1\nweight_bits: \"{'8' * 20_000}\"\nact_bits: [8]\n")
    line = one_line_error(cli("inspect", "torchvision:resnet18", "--profile", profile), EXIT_BAD_INPUT, "weight_bits")
    assert len(line) < 250


# -- (4) control characters and bidi marks -------------------------------------------------------

EVIL = "evil\x1b[31mred\u202egnp.exe\x07"


def _assert_escaped(text: str) -> None:
    assert "\x1b" not in text and "\u202e" not in text and "\x07" not in text, repr(text)
    assert "\\x1b[31m" in text and "\\u202e" in text, text


def test_report_outputs_escape_names(run_copy: Path) -> None:
    report = json.loads((run_copy / "report.json").read_text())
    report["profile"] = EVIL
    report["layers"][0]["name"] = EVIL + "[bold]x[/bold]"
    (run_copy / "report.json").write_text(json.dumps(report))
    for fmt in ("table", "markdown", "csv"):
        result = cli("report", run_copy, "--format", fmt)
        assert result.exit_code == 0, result.output
        _assert_escaped(result.stdout)
    table = cli("report", run_copy).stdout
    assert "[bold]x[/bold]" in table  # no Rich markup either
    assert json.loads(cli("report", run_copy, "--format", "json").stdout)["profile"] == EVIL  # JSON keeps the data


def test_error_lines_escape_paths(tmp_path: Path) -> None:
    bad = tmp_path / f"{EVIL}\nsecond line.pt"
    result = cli("inspect", bad)
    one_line_error(result, EXIT_BAD_INPUT)
    _assert_escaped(result.stderr)
    assert "\\nsecond line" in result.stderr and len(result.stderr.strip().splitlines()) == 2


def test_log_lines_escape_profile_names(digits_ckpt: str, tmp_path: Path) -> None:
    profile = tmp_path / "hw.yaml"
    profile.write_text('schema_version: 1\nname: "evil\\e[31mred\\u202egnp.exe\\a"\nweight_bits: [4, 8]\nact_bits: [8]\n')
    result = cli("compress", digits_ckpt, "--arch", ARCH, *FAST, "--budget-bops", "1000", "--profile", profile,
                 "--out", tmp_path / "run")
    one_line_error(result, 3, "profile evil")
    _assert_escaped(result.stderr)


def test_check_lines_escape_budget_names(run_copy: Path) -> None:
    report = json.loads((run_copy / "report.json").read_text())
    report["budget"][EVIL] = 5.0
    report["cost"][EVIL] = 1.0
    (run_copy / "report.json").write_text(json.dumps(report))
    result = cli("check", run_copy)
    assert result.exit_code == 0, result.output
    _assert_escaped(result.stdout)
