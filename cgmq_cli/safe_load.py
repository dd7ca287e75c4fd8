"""Every deserialisation cgmq does: YAML, JSON and torch files (and, through safe_pt2, .pt2 archives), with bounds.

Files are untrusted input. Nothing here runs code from a file unless the
caller passes ``trusted=True``, which only the ``--trust-checkpoint`` flag of
the current command line may set:

* YAML (profiles, ``cgmq.yaml``): a regular file of at most
  :data:`MAX_YAML_BYTES`, safe constructors only, duplicate keys refused, at
  most :data:`MAX_YAML_ALIASES` aliases and :data:`MAX_YAML_DEPTH` levels of
  nesting (an alias bomb fails at once instead of expanding).
* JSON (run directories): a regular file of at most :data:`MAX_JSON_BYTES`.
* torch files: ``torch.load(weights_only=True)``; a pickled object is
  unpickled only when trusted.
* ``.pt2`` (``torch.export.save``): :mod:`cgmq_cli.safe_pt2` checks the archive before torch reads it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import pickle
import re
import stat
import zipfile
from pathlib import Path
from typing import Any, Iterator


from cgmq_cli.errors import CgmqError, CheckpointError, UsageError
from cgmq_cli.sanitize import cut, short

MAX_YAML_BYTES = 64 * 1024
MAX_YAML_ALIASES = 16
MAX_YAML_DEPTH = 20
MAX_JSON_BYTES = 16 * 1024 * 1024

TRUST_HINT = "pass --trust-checkpoint if you trust this file (it may run code from the file)"


# --------------------------------------------------------------------------- plain files ---


def _read_regular(path: Path, what: str, limit: int, error: type[CgmqError]) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (no FIFOs, devices or huge files)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        dangling = path.is_symlink()
        raise error(f"{what} is a symbolic link to a missing file" if dangling else f"{what} not found") from None
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{what} is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} is not a regular file")
    if info.st_size > limit:
        raise error(f"{what} is {info.st_size:,} bytes; cgmq reads at most {limit:,}", "is this the right file?")
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror}") from None
    if len(data) > limit:
        raise error(f"{what} is larger than {limit:,} bytes", "is this the right file?")
    return data


# ------------------------------------------------------------------------------------ YAML ---


@functools.lru_cache(maxsize=None)
def _bounded_loader() -> type:
    """SafeLoader with bounded aliases and nesting that refuses duplicate keys (yaml is imported on first use)."""
    import yaml

    class YamlLimitError(yaml.YAMLError):
        """A document beyond the size, alias or nesting bounds."""

        def __init__(self, problem: str, mark: Any) -> None:
            super().__init__(problem)
            self.problem, self.problem_mark = problem, mark

    class BoundedLoader(yaml.SafeLoader):
        def __init__(self, stream: Any) -> None:
            super().__init__(stream)
            self._aliases = 0
            self._depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                self._aliases += 1
                if self._aliases > MAX_YAML_ALIASES:
                    raise YamlLimitError(f"more than {MAX_YAML_ALIASES} aliases (*name); write the values out",
                                         self.peek_event().start_mark)
            self._depth += 1
            try:
                if self._depth > MAX_YAML_DEPTH:
                    raise YamlLimitError(f"nested deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark)
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    def no_duplicates(loader: BoundedLoader, node: Any, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = None if key_node.tag.endswith(":merge") else loader.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float)):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {short(key)}",
                                                            key_node.start_mark)
                seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    BoundedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, no_duplicates)
    return BoundedLoader


def parse_yaml(text: str, source: str, error: type[CgmqError] = UsageError) -> Any:
    """Load YAML text within the bounds; every problem is one ``error`` line naming ``source``."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
        raise error(f"{source}: larger than {MAX_YAML_BYTES // 1024} KiB", "a profile or project file is a few lines")
    import yaml

    try:
        return yaml.load(text, Loader=_bounded_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{source}: invalid YAML{at}: {cut(problem, 120) if isinstance(problem, str) else problem}") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer beyond Python's digit limit
        raise error(f"{source}: invalid YAML: {short(str(exc), 120)}") from None


def read_yaml(path: Path, source: str, error: type[CgmqError] = UsageError) -> Any:
    """A bounded YAML file (see the module docstring)."""
    data = _read_regular(Path(path), source, MAX_YAML_BYTES, error)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{source}: not UTF-8 text") from None
    return parse_yaml(text, source, error)


# ------------------------------------------------------------------------------------ JSON ---


def read_json(path: Path, what: str | None = None, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file of a run directory; missing, oversized or broken files are one UsageError line."""
    what = what or str(path)
    try:
        data = _read_regular(Path(path), what, limit, UsageError)
    except UsageError as exc:
        if exc.message.endswith(" not found"):
            raise UsageError(f"{what} is missing", "is this a cgmq run directory? see `cgmq compress --help`") from None
        raise
    try:
        return json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno})",
                         "the run directory was damaged or edited; compress again") from None
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise UsageError(f"{what} is not valid JSON ({type(exc).__name__})",
                         "the run directory was damaged or edited; compress again") from None


# ------------------------------------------------------------------------------ torch files ---


def torch_module():
    """torch, imported on first use (reading YAML or JSON must not pay for it)."""
    import torch

    return torch


def _unreadable(what: str, exc: BaseException, detail: str | None = None) -> CheckpointError:
    first = detail or (str(exc).splitlines()[0] if str(exc) else "")
    return CheckpointError(f"{what} is not a readable PyTorch checkpoint (corrupt, truncated or another format)",
                           f"torch.load said: {type(exc).__name__}: {cut(first, 120)}")


def load_weights(source: Path | bytes, what: str) -> Any:
    """``torch.load(weights_only=True)`` on CPU: tensors and plain containers only, never code."""
    torch = torch_module()
    target = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return torch.load(target, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise CheckpointError(f"{what} contains a pickled Python object ({found.group(1)}), which cgmq "
                                  "never unpickles here") from None
        raise _unreadable(what, exc) from None
    except FileNotFoundError:
        raise CheckpointError(f"{what} is missing") from None
    except Exception as exc:  # noqa: BLE001 - zip/miniz/EOF errors of corrupt or truncated files
        raise _unreadable(what, exc) from None


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return []


def load_torch_file(path: Path, trusted: bool) -> Any:
    """A ``torch.save`` file: weights-only first; a pickled object only when ``trusted``."""
    torch = torch_module()
    names = _zip_names(path)
    if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
        raise CheckpointError(f"{path} is a TorchScript archive, which cgmq does not support",
                              "save a state_dict (torch.save(model.state_dict(), ...)) with --arch, or a .pt2 (torch.export.save)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        bad_op = re.search(r"Unsupported operand \d+", str(exc))
        if bad_op:  # not a pickle stream that torch.save writes: garbage bytes or another format
            raise _unreadable(str(path), exc, bad_op.group(0)) from None
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = found.group(1) if found else "arbitrary Python objects"
        if not trusted:
            raise CheckpointError(
                f"{path} contains a pickled Python object ({what}); unpickling it could run code from the file, so cgmq refuses",
                "save model.state_dict() and pass --arch, or pass --trust-checkpoint if you trust this file",
            ) from None
    except Exception as exc:  # noqa: BLE001 - corrupt archive, garbage bytes, truncated zip
        raise _unreadable(str(path), exc) from None
    try:
        with guard_user_code(f"unpickling {path}"):
            return torch.load(path, map_location="cpu", weights_only=False)
    except CgmqError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path} could not be unpickled: {type(exc).__name__}: {short(str(exc), 160)}") from None


@contextlib.contextmanager
def guard_user_code(what: str, error: type[CgmqError] = CheckpointError, hint: str | None = None) -> Iterator[None]:
    """Turn an exception or ``sys.exit`` raised by user code into one ``error`` line naming ``what``.

    ``sys.exit(3)`` in an arch file must not become cgmq's exit 3 (infeasible budget).
    """
    try:
        yield
    except CgmqError:
        raise
    except SystemExit as exc:
        raise error(f"{what}: the code called sys.exit({short(exc.code, 40)})", hint or "user code must not exit") from None
    except Exception as exc:  # noqa: BLE001 - user code may raise anything
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise error(f"{what} raised {type(exc).__name__}" + (f": {cut(first, 160)}" if first else ""),
                    hint) from None
