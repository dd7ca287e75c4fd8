"""``.pt2`` archives (``torch.export.save``), read without running code from them.

torch's loader falls back to unpickling (weights or constants marked
``use_pickle``, custom and opaque objects, sample inputs that are not
weights-only), evaluates every symbolic-shape string with ``sympy.sympify``
and ``exec``s the program's ``guards_code``; its graph may call any
``torch.*`` function. :func:`load_pt2` therefore reads the archive itself
first, checks every entry (no pickle, sample inputs weights-only and tensors
only, shape expressions and guards in a small arithmetic grammar, operators
from ``torch.ops.aten``/``prims`` and plain arithmetic only) and hands torch
a fresh archive that holds exactly the checked bytes. Only ``trusted=True``
(``--trust-checkpoint`` on the current command line) skips the checks.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

from cgmq_cli.errors import CheckpointError
from cgmq_cli.safe_load import TRUST_HINT, torch_module
from cgmq_cli.sanitize import cut, short

MAX_PT2_JSON_BYTES = 256 * 1024 * 1024
MAX_PT2_TENSOR_ELEMENTS = 2**33


# torch.export's archive layout (torch/export/pt2_archive/constants.py), relative to its root folder.
_PT2_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_PT2_PATTERNS = (
    re.compile(r"models/(?P<model>[A-Za-z0-9_]+)\.json"),
    re.compile(r"data/weights/weight_\d+"),
    re.compile(r"data/weights/(?P<model>[A-Za-z0-9_]+)_weights_config\.json"),
    re.compile(r"data/constants/tensor_\d+"),
    re.compile(r"data/constants/(?P<model>[A-Za-z0-9_]+)_constants_config\.json"),
    re.compile(r"data/sample_inputs/(?P<model>[A-Za-z0-9_]+)\.pt"),
    re.compile(r"extra/[^/]+"),
)
_OP_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_ATEN_TARGET = re.compile(rf"torch\.ops\.(aten|prims)\.(?P<op>{_OP_NAME})(\.{_OP_NAME})?")
_ATEN_DENIED = {"from_file", "_print", "save", "_save"}  # file system / terminal side effects
_OPERATOR_OK = {"getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "lt",
                "le", "gt", "ge", "eq", "ne", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift", "matmul"}
_MATH_OK = {"floor", "ceil", "trunc", "sqrt", "isnan", "isinf", "isfinite", "fabs"}
_TORCH_SYM_OK = {"sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum", "sym_float"}
_GRAPH_INPUT_KINDS = {"as_tensor", "as_sym_int", "as_sym_float", "as_sym_bool", "as_int", "as_float", "as_bool",
                      "as_none", "as_ints", "as_floats", "as_bools", "as_tensors", "as_optional_tensor",
                      "as_optional_tensors", "as_sym_ints", "as_sym_floats", "as_sym_bools", "as_scalar_type",
                      "as_memory_format", "as_layout", "as_device"}
# Names a symbolic-shape expression (sympy srepr or str form) or a guard may use.
_SYMPY_FUNCS = {
    "Symbol", "Dummy", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor",
    "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan",
    "Equality", "Unequality", "And", "Or", "Not", "Piecewise", "ExprCondPair", "sqrt", "FloorDiv", "ModularIndexing",
    "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "IntTrueDiv",
    "FloatTrueDiv", "ToFloat", "TruncToInt", "TruncToFloat", "RoundToInt", "RoundDecimal", "PowByNatural", "FloatPow",
    "IsNonOverlappingAndDenseIndicator", "Identity", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or",
    "OpaqueUnaryFn_sqrt", "OpaqueUnaryFn_exp", "OpaqueUnaryFn_log", "sym_max", "sym_min", "sym_float", "sym_int",
}
_SYMPY_CONSTS = {"True", "False", "None", "oo", "zoo", "nan", "inf", "pi", "E"}
_SYMBOL = re.compile(r"[a-z]{1,4}\d+")
_ATTR_OK = {"size", "stride", "storage_offset", "dim", "numel"}
_BIN_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitAnd, ast.BitOr,
            ast.LShift, ast.RShift)
_UNARY_OPS = (ast.USub, ast.UAdd, ast.Not, ast.Invert)


def _unsafe(what: str, path: Path) -> CheckpointError:
    return CheckpointError(f"{path} {what}; loading it could run code from the file, so cgmq refuses", TRUST_HINT)


def _safe_expression(text: Any, guard: bool = False) -> bool:
    """Whether ``text`` is plain arithmetic on symbols (what torch writes), nothing that reaches Python."""
    if not isinstance(text, str) or len(text) > 10_000:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False

    def ok(node: ast.AST) -> bool:
        if isinstance(node, ast.Expression):
            return ok(node.body)
        if isinstance(node, ast.Constant):
            return isinstance(node.value, (int, float, bool, type(None))) or (
                isinstance(node.value, str) and len(node.value) <= 100 and node.value.isprintable())
        if isinstance(node, ast.Name):
            return node.id in _SYMPY_FUNCS or node.id in _SYMPY_CONSTS or bool(_SYMBOL.fullmatch(node.id)) or (
                guard and node.id in ("L", "math"))
        if isinstance(node, ast.BinOp):
            return isinstance(node.op, _BIN_OPS) and ok(node.left) and ok(node.right)
        if isinstance(node, ast.UnaryOp):
            return isinstance(node.op, _UNARY_OPS) and ok(node.operand)
        if isinstance(node, ast.BoolOp):
            return all(ok(v) for v in node.values)
        if isinstance(node, ast.Compare):
            return ok(node.left) and all(ok(c) for c in node.comparators) and all(
                isinstance(o, (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)) for o in node.ops)
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                func_ok = func.id in _SYMPY_FUNCS
            elif isinstance(func, ast.Attribute) and guard:
                func_ok = (func.attr in _ATTR_OK and ok(func.value)) or (
                    isinstance(func.value, ast.Name) and func.value.id == "math" and func.attr in _MATH_OK)
            else:
                func_ok = False
            return func_ok and all(ok(a) for a in node.args) and all(
                k.arg is not None and isinstance(k.value, ast.Constant) and ok(k.value) for k in node.keywords)
        if isinstance(node, ast.Subscript) and guard:
            return ok(node.value) and isinstance(node.slice, ast.Constant) and ok(node.slice)
        if isinstance(node, ast.Attribute) and guard:
            return isinstance(node.value, ast.Name) and node.value.id == "math" and node.attr in ("inf", "pi")
        return False

    return ok(tree)


def _safe_target(target: Any) -> bool:
    if not isinstance(target, str):
        return False
    found = _ATEN_TARGET.fullmatch(target)
    if found:
        return not found.group("op").startswith("__") and found.group("op") not in _ATEN_DENIED
    module, _, name = target.partition(".")
    allowed = {"_operator": _OPERATOR_OK, "math": _MATH_OK, "torch": _TORCH_SYM_OK}.get(module, set())
    return name in allowed


def _walk(obj: Any, visit: Callable[[dict], None], depth: int = 0) -> None:
    if depth > 200:
        raise ValueError("nested too deeply")
    if isinstance(obj, dict):
        visit(obj)
        for value in obj.values():
            _walk(value, visit, depth + 1)
    elif isinstance(obj, list):
        for value in obj:
            _walk(value, visit, depth + 1)


def _check_sizes(node: dict, path: Path) -> None:
    """A declared tensor shape (torch allocates zeros of it for an empty record) within bounds."""
    sizes = node.get("sizes")
    if not isinstance(sizes, list):
        return
    numel = 1
    for dim in sizes:
        value = dim.get("as_int") if isinstance(dim, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            numel *= max(value, 0)
            if numel > MAX_PT2_TENSOR_ELEMENTS:
                raise CheckpointError(f"{path} declares a tensor of more than {MAX_PT2_TENSOR_ELEMENTS:,} elements",
                                      "is this a real model?")


def _check_program_json(program: Any, path: Path) -> None:
    """The serialized graph: shape strings, guards, operators and graph inputs in the safe subset."""
    if not isinstance(program, dict):
        raise CheckpointError(f"{path}: the program is not a JSON object")
    guards = program.get("guards_code") or []
    if not isinstance(guards, list) or not all(_safe_expression(g, guard=True) for g in guards):
        bad = next((g for g in guards if not _safe_expression(g, guard=True)), guards) if isinstance(guards, list) else guards
        raise _unsafe(f"has a guard that is not a plain shape check ({short(bad)})", path)

    def visit(node: dict) -> None:
        if "expr_str" in node and not _safe_expression(node["expr_str"]):
            raise _unsafe(f"has a shape expression that is not plain arithmetic ({short(node['expr_str'])})", path)
        if "target" in node and "inputs" in node and "outputs" in node and not _safe_target(node["target"]):
            raise _unsafe(f"calls {short(node['target'])}, which is not a tensor operator cgmq loads from an "
                          "untrusted file", path)
        if "nodes" in node and "inputs" in node and isinstance(node["inputs"], list):
            for arg in node["inputs"]:
                kinds = set(arg) if isinstance(arg, dict) else {"?"}
                if not kinds <= _GRAPH_INPUT_KINDS:
                    raise _unsafe(f"has a graph input of kind {short(sorted(kinds))}, which cgmq does not load "
                                  "from an untrusted file", path)
        _check_sizes(node, path)

    try:
        _walk(program, visit)
    except ValueError:
        raise CheckpointError(f"{path}: the program is nested too deeply") from None


def _check_payload_config(config: Any, path: Path, entry: str, prefix: str, present: set[str]) -> None:
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise CheckpointError(f"{path}: {entry} is not a payload table", "the file is damaged")
    for fqn, meta in config["config"].items():
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: {entry} entry {short(fqn)} is not a table", "the file is damaged")
        if meta.get("use_pickle") is not False:
            raise _unsafe(f"stores {short(fqn)} as a pickle", path)
        name = meta.get("path_name")
        if not isinstance(name, str) or not re.fullmatch(prefix + r"\d+", name):
            raise _unsafe(f"stores {short(fqn)} as {short(name)}, not as raw tensor bytes", path)
        if name not in present:
            raise CheckpointError(f"{path}: {entry} names {short(name)}, which the archive lacks", "the file is damaged")
        if not isinstance(meta.get("tensor_meta"), dict):
            raise CheckpointError(f"{path}: {entry} entry {short(fqn)} has no tensor metadata", "the file is damaged")
        _check_sizes(meta["tensor_meta"], path)


def _check_sample_inputs(data: bytes, path: Path) -> None:
    """Weights-only loadable, and nothing but tensors and numbers (no strings that reach torch's guard code)."""
    torch = torch_module()
    try:
        inputs = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _unsafe("has sample inputs that are a pickle of Python objects, not tensors", path) from None
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: its sample inputs are unreadable ({type(exc).__name__})",
                              "the file is damaged; export it again") from None
    leaves: list = []

    def flatten(obj: Any, depth: int = 0) -> None:
        if depth > 20:
            raise _unsafe("has sample inputs nested too deeply", path)
        if isinstance(obj, (list, tuple)):
            for item in obj:
                flatten(item, depth + 1)
        elif isinstance(obj, dict):
            for item in obj.values():
                flatten(item, depth + 1)
        else:
            leaves.append(obj)

    flatten(inputs)
    for leaf in leaves:
        if not (leaf is None or isinstance(leaf, (torch.Tensor, int, float, bool))):
            raise _unsafe(f"has a sample input of type {type(leaf).__name__}, not a tensor", path)


def _checked_archive(data: bytes, path: Path) -> bytes:
    """Check every entry of a torch.export archive; return a fresh archive of exactly the checked entries."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"{path} is not a loadable torch.export program: not a zip archive ({short(str(exc), 80)})",
                              "save it with torch.export.save(program, 'model.pt2')") from None
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise _unsafe("holds two entries with the same name", path)
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise CheckpointError(f"{path} is not a torch.export archive of this torch version (no single root folder)",
                              f"export it again with torch.export.save; {TRUST_HINT}")
    root = roots.pop() + "/"
    contents: dict[str, bytes] = {}
    models: set[str] = set()
    for info in infos:
        rel = info.filename[len(root):]
        if info.is_dir():
            continue
        match = next((p.fullmatch(rel) for p in _PT2_PATTERNS if p.fullmatch(rel)), None)
        if rel not in _PT2_FIXED and match is None:
            raise _unsafe(f"holds {short(rel)}, an entry cgmq cannot check for code", path)
        if match is not None and match.groupdict().get("model"):
            models.add(match.group("model"))
        limit = MAX_PT2_JSON_BYTES if rel.endswith(".json") or not rel.startswith("data/") else None
        if limit is not None and info.file_size > limit:
            raise CheckpointError(f"{path}: {short(rel)} is {info.file_size:,} bytes", "is this a real model?")
        try:
            contents[rel] = archive.read(info)
        except Exception as exc:  # noqa: BLE001 - CRC errors, truncated entries, bad compression
            raise CheckpointError(f"{path} is not a loadable torch.export program: {short(rel)} is damaged "
                                  f"({type(exc).__name__})", "export it again with torch.export.save") from None
    if contents.get("archive_format", b"").strip() != b"pt2":
        raise CheckpointError(f"{path} is not a torch.export program (no archive_format pt2)",
                              "save it with torch.export.save(program, 'model.pt2')")
    present_w = {r.rsplit("/", 1)[1] for r in contents if r.startswith("data/weights/weight_")}
    present_c = {r.rsplit("/", 1)[1] for r in contents if r.startswith("data/constants/tensor_")}
    for model in sorted(models):
        for rel in (f"models/{model}.json", f"data/weights/{model}_weights_config.json",
                    f"data/constants/{model}_constants_config.json", f"data/sample_inputs/{model}.pt"):
            if rel not in contents:
                raise CheckpointError(f"{path} is not a complete torch.export program: {short(rel)} is missing",
                                      "export it again with torch.export.save")
        try:
            program = json.loads(contents[f"models/{model}.json"])
            weights = json.loads(contents[f"data/weights/{model}_weights_config.json"])
            constants = json.loads(contents[f"data/constants/{model}_constants_config.json"])
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"{path}: the program of {short(model)} is not valid JSON ({type(exc).__name__})",
                                  "export it again with torch.export.save") from None
        _check_program_json(program, path)
        _check_payload_config(weights, path, "the weight table", "weight_", present_w)
        _check_payload_config(constants, path, "the constant table", "tensor_", present_c)
        _check_sample_inputs(contents[f"data/sample_inputs/{model}.pt"], path)
    if "model" not in models:
        raise CheckpointError(f"{path} holds no program named `model`", "save it with torch.export.save")
    fresh = io.BytesIO()
    with zipfile.ZipFile(fresh, "w", zipfile.ZIP_STORED) as out:
        for rel, payload in contents.items():
            out.writestr(root + rel, payload)
    return fresh.getvalue()


@contextlib.contextmanager
def _weights_only_everywhere() -> Iterator[None]:
    """A second fence while torch reads a checked archive: every torch.load is weights-only."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    saved = {k: os.environ.get(k) for k in (key, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ[key] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_pt2(path: Path, trusted: bool) -> Any:
    """A ``torch.export`` program from ``path``; see the module docstring for what is checked."""
    torch = torch_module()
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    if not trusted:
        data = _checked_archive(data, Path(path))
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.CRITICAL)  # torch.export.load logs a full traceback for an unreadable file
    fence = contextlib.nullcontext() if trusted else _weights_only_everywhere()
    try:
        with fence:
            return torch.export.load(io.BytesIO(data))
    except SystemExit as exc:  # a trusted file's pickle may call sys.exit
        raise CheckpointError(f"loading {path} called sys.exit({short(exc.code, 40)})") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged archives
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path} is not a loadable torch.export program: {type(exc).__name__}: "
                              f"{cut(first, 160)}",
                              "save it with torch.export.save(program, 'model.pt2') from this torch version") from None
    finally:
        export_log.setLevel(level)
