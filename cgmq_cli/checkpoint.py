"""Load models safely: .pt2 programs, state_dict + --arch, torchvision names, trusted pickles.

Checkpoints are untrusted input: unpickling a whole ``nn.Module`` runs code
from the file. cgmq reads every file with ``torch.load(weights_only=True)``
first, which only rebuilds tensors and plain containers; a file that needs more
is refused unless the user passes ``--trust-checkpoint``.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from cgmq_cli import safe_load, safe_pt2
from cgmq_cli.errors import CheckpointError
from cgmq_cli.safe_load import guard_user_code
from cgmq_cli.sanitize import cut

TORCHVISION = "torchvision:"
STATE_KEYS = ("state_dict", "model_state_dict", "model")


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from: enough to rebuild its architecture later."""

    model: str  # a file path or "torchvision:NAME"
    arch: str | None = None
    trusted: bool = False
    sha256: str | None = None
    kind: str = "state_dict"  # "state_dict" | "pt2" | "torchvision" | "pickle"
    sample_shape: tuple[int, ...] | None = None  # one example's shape, when the file records it
    sample_dtype: str = "float32"  # of that example: float32, or int64 (token ids)
    fixed_batch: int | None = None  # a .pt2 exported with a static batch size (not recorded in config.json)

    def as_dict(self) -> dict:
        return {"model": self.model, "arch": self.arch, "trusted": self.trusted, "sha256": self.sha256,
                "kind": self.kind, "sample_shape": list(self.sample_shape) if self.sample_shape else None}


def fixed_batch_error(model: str, batch: int) -> CheckpointError:
    """A .pt2 exported with a static batch size: cgmq trains and evaluates on batches."""
    return CheckpointError(f"{model} was exported with a fixed batch size of {batch}; cgmq trains and evaluates on "
                           "batches", "export it with a dynamic batch dimension: torch.export.export(model, (x,), "
                           "dynamic_shapes=({0: torch.export.Dim('batch')},))")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_unchanged(source: Mapping[str, Any]) -> bool:
    """Whether the model file a run's config.json ``source`` names is still there with the bytes it recorded."""
    path = Path(source["model"])
    return path.is_file() and file_sha256(path) == source["sha256"]


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"model file not found: {path}", "check the path, or use torchvision:NAME for a stock model")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a model file", "pass the checkpoint file inside it")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file", "pass the checkpoint file itself")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)", "the file was not written completely; save the model again")


def is_user_code(spec: str | None) -> bool:
    """Whether importing ``spec`` (an --arch, --loss or --data spec) runs code outside cgmq, torch and torchvision."""
    if not spec or spec.startswith(TORCHVISION) or ":" not in spec:
        return False
    target = spec.rpartition(":")[0]
    if target.endswith(".py") or "/" in target:
        return True
    return target.split(".")[0] not in ("cgmq_cli", "torch", "torchvision")


def import_object(spec: str, flag: str = "--arch") -> Any:
    """Import ``package.module:Name`` or ``path/to/file.py:Name`` (errors name ``flag``)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise CheckpointError(f"{flag} {cut(spec, 200)}: expected package.module:Name, path/to/file.py:Name or torchvision:NAME")
    with guard_user_code(f"{flag} {cut(spec, 200)}: importing {cut(target, 200)}"):
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise CheckpointError(f"{flag} {cut(spec, 200)}: file {path} not found")
            mod_spec = importlib.util.spec_from_file_location(f"cgmq_arch_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(target)
            except ModuleNotFoundError as exc:
                raise CheckpointError(f"{flag} {cut(spec, 200)}: cannot import {cut(target, 200)}: "
                                      f"ModuleNotFoundError: {cut(str(exc), 120)}") from None
    if not hasattr(module, name):
        close = difflib.get_close_matches(name, [n for n in dir(module) if not n.startswith("_")], n=1)
        raise CheckpointError(f"{flag} {cut(spec, 200)}: {cut(target, 200)} has no attribute {cut(name)}",
                              f"did you mean {target}:{close[0]}?" if close else None)
    return getattr(module, name)


def build_arch(spec: str, num_classes: int | None = None) -> nn.Module:
    """Instantiate an architecture: torchvision:NAME, package.module:Name or file.py:Name."""
    if spec.startswith(TORCHVISION):
        import torchvision

        name = spec[len(TORCHVISION):]
        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            close = difflib.get_close_matches(name, available, n=1)
            raise CheckpointError(f"unknown torchvision model {name!r}", f"did you mean torchvision:{close[0]}?" if close else
                                  "see torchvision.models.list_models()")
        kwargs = {"num_classes": num_classes} if num_classes else {}
        if name.startswith("inception") or name.startswith("googlenet"):
            kwargs["aux_logits"] = False
            kwargs["init_weights"] = False
        return torchvision.models.get_model(name, weights=None, **kwargs)
    factory = import_object(spec)
    with guard_user_code(f"--arch {cut(spec, 200)}: calling {cut(getattr(factory, '__name__', factory))}()"):
        model = factory()
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"--arch {cut(spec, 200)} did not produce an nn.Module (got {type(model).__name__})")
    return model


def _extract_state(obj: Any) -> Mapping[str, torch.Tensor] | None:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in STATE_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _extract_state(obj[key])
    return None


def guess_num_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    last = [v for k, v in state.items() if k.endswith(".weight") and v.ndim == 2]
    return int(last[-1].shape[0]) if last else None


def load_state_into(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict) with an error that names the first mismatching key."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise CheckpointError(f"{what} does not fit the architecture: unexpected key {key!r}",
                                  "check --arch: the checkpoint was saved from a different model")
        if tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{what} does not fit the architecture: {key!r} has shape {tuple(value.shape)} in the file "
                f"but {tuple(own[key].shape)} in the model", "check --arch: the checkpoint was saved from a different model")
    missing = [k for k in own if k not in state]
    if missing:
        raise CheckpointError(f"{what} does not fit the architecture: missing key {missing[0]!r}",
                              "check --arch: the checkpoint was saved from a different model")
    model.load_state_dict(state, strict=True)


def load_model(spec: str, arch: str | None = None, trust: bool = False) -> tuple[nn.Module, ModelSource]:
    """Load MODEL as given on the command line; returns the model in eval mode and its source."""
    if spec.startswith(TORCHVISION) and not Path(spec).exists():
        if arch:
            raise CheckpointError(f"{spec} already names the architecture; --arch is only for state_dict files")
        return build_arch(spec).eval(), ModelSource(model=spec, kind="torchvision")
    path = Path(spec)
    _check_file(path)
    digest = file_sha256(path)
    if path.suffix == ".pt2":
        module, shape, batch, dtype = _load_pt2(path, trust)
        return module, ModelSource(model=str(path.resolve()), sha256=digest, kind="pt2", sample_shape=shape,
                                   fixed_batch=batch, sample_dtype=dtype)
    obj = safe_load.load_torch_file(path, trust)
    if isinstance(obj, nn.Module):
        return obj.eval(), ModelSource(model=str(path.resolve()), trusted=True, sha256=digest, kind="pickle")
    state = _extract_state(obj)
    if state is None:
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict or model",
                              "save model.state_dict() or use torch.export.save for a .pt2")
    if not arch:
        raise CheckpointError(f"{path} is a state_dict, which needs the architecture",
                              "pass --arch package.module:Name, --arch path/to/file.py:Name or --arch torchvision:NAME")
    model = build_arch(arch, guess_num_classes(state) if arch.startswith(TORCHVISION) else None)
    load_state_into(model, state, str(path))
    return model.eval(), ModelSource(model=str(path.resolve()), arch=arch, sha256=digest, kind="state_dict")


def _load_pt2(path: Path, trust: bool) -> tuple[nn.Module, tuple[int, ...] | None, int | None, str]:
    """The program's module, the shape and dtype of one example of its first input, and its batch size
    when fixed."""
    program = safe_pt2.load_pt2(path, trust)
    args = program.example_inputs[0] if program.example_inputs else ()
    shape = tuple(args[0].shape[1:]) if args and isinstance(args[0], torch.Tensor) else None
    integer = bool(args) and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point()
    with guard_user_code(f"building the module of {path}"):
        module = program.module()
    # ExportedProgram.module() makes train()/eval() raise NotImplementedError through instance
    # attributes (the graph's ops are fixed either way); cgmq only needs the mode flag to toggle.
    for name in ("train", "eval"):
        module.__dict__.pop(name, None)
    return module, shape, _fixed_batch(program), "int64" if integer else "float32"


def _fixed_batch(program: Any) -> int | None:
    """The batch size of the program's first user input when it is a plain integer (not dynamic)."""
    users = list(getattr(program.graph_signature, "user_inputs", ()))
    for node in program.graph.nodes:
        if node.op == "placeholder" and users and node.name == users[0]:
            value = node.meta.get("val")
            size = getattr(value, "shape", None)
            if size is not None and len(size) and isinstance(size[0], int):
                return int(size[0])
            return None
    return None
