"""A second runtime for ``cgmq verify --runtime openvino``: does the file load in OpenVINO, which layers run in int8 there,
and do its outputs agree with onnxruntime's.

OpenVINO (the optional extra ``cgmq[openvino]``) runs in a child process
(:mod:`cgmq_cli.export.openvino_worker`), because some QDQ patterns make its
compile_model abort the process. Each layer of the file (a Conv / Gemm /
MatMul or integer kernel as ``cgmq verify`` reads it) is found in OpenVINO's
runtime model (``compiled_model.get_runtime_model()``) by the ONNX node names
that node executes (rt_info ``originalLayersNames``; OpenVINO's ONNX frontend
names a Conv's bias-free part ``<node>/WithoutBiases``); its rt_info
``runtimePrecision`` says the precision it runs in (u8 / i8: an int8 kernel).

The comparison feeds both runtimes the same seeded standard-normal inputs and
reports the top-1 agreement and the largest absolute output difference.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cgmq_cli.errors import CgmqError

INSTALL = "pip install 'cgmq[openvino]'  (or: pip install openvino)"
EXAMPLES = 32
COMPUTE_TYPES = frozenset({"Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution",
                           "GroupDeconvolution", "Gemm"})
INT8_PRECISIONS = frozenset({"u8", "i8"})
TIMEOUT_S = 600


@dataclass(frozen=True)
class OpenVinoLayer:
    node: str
    layer_type: str | None  # OpenVINO's layer type (Convolution, FullyConnected, ...); None: not found
    precision: str | None  # runtimePrecision: u8/i8 (int8 kernel), f32, bf16, ...

    @property
    def int8(self) -> bool:
        return self.precision in INT8_PRECISIONS

    def text(self) -> str:
        if self.layer_type is None:
            return "not found"
        return f"{'int8' if self.int8 else 'float'} ({self.layer_type} {self.precision})"


@dataclass(frozen=True)
class OpenVinoResult:
    version: str
    layers: tuple[OpenVinoLayer, ...]
    agreement: float  # percent of top-1 predictions equal to onnxruntime's
    max_abs_diff: float
    examples: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        return {"version": self.version, "agreement": self.agreement, "max_abs_diff": self.max_abs_diff,
                "examples": self.examples, "notes": list(self.notes),
                "layers": [{**asdict(layer), "int8": layer.int8} for layer in self.layers]}


def available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def require() -> None:
    """One line (exit 2) with the install command when OpenVINO is not installed."""
    if not available():
        raise CgmqError("--runtime openvino needs OpenVINO, which is not installed", f"install it: {INSTALL}")


def _inputs(path: Path) -> list[np.ndarray]:
    """Seeded inputs for the file's single float input: ``EXAMPLES`` examples in batches the file accepts."""
    from cgmq_cli.export.lint import load_session

    session = load_session(path)
    metas = session.get_inputs()
    if len(metas) != 1:
        raise CgmqError(f"{path.name} has {len(metas)} inputs; --runtime openvino compares files with one input",
                        "verify the file without --runtime openvino")
    meta = metas[0]
    if meta.type not in ("tensor(float)", "tensor(float16)"):
        raise CgmqError(f"{path.name}: input `{meta.name}` is {meta.type}; --runtime openvino feeds float inputs",
                        "verify the file without --runtime openvino")
    dims = list(meta.shape)
    if any(not isinstance(d, int) for d in dims[1:]):
        raise CgmqError(f"{path.name}: input `{meta.name}` has symbolic dimensions {dims}",
                        "export the model with static shapes (only the batch dimension may be symbolic)")
    fixed = dims[0] if dims and isinstance(dims[0], int) else None
    batch = fixed or EXAMPLES
    gen = np.random.default_rng(0)
    dtype = np.float16 if meta.type == "tensor(float16)" else np.float32
    return [gen.standard_normal((batch, *dims[1:])).astype(dtype) for _ in range(max(1, EXAMPLES // batch))]


def _run_worker(path: Path, batches: list[np.ndarray], tmp: Path) -> tuple[list[np.ndarray], dict]:
    inputs, outputs, runtime = tmp / "inputs.npz", tmp / "outputs.npz", tmp / "runtime.json"
    np.savez(inputs, **{f"arg{i}": b for i, b in enumerate(batches)})
    cmd = [sys.executable, "-m", "cgmq_cli.export.openvino_worker", str(path), str(inputs), str(outputs),
           str(runtime)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    except subprocess.TimeoutExpired:
        raise CgmqError(f"OpenVINO did not finish loading and running {path.name} within {TIMEOUT_S} s",
                        "try a smaller model") from None
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        raise CgmqError(f"OpenVINO crashed ({name}) loading {path.name}: {_last_line(done.stderr)}",
                        "export with --portable, which avoids the patterns OpenVINO 2026 aborts on")
    if done.returncode != 0:
        raise CgmqError(f"OpenVINO cannot load {path.name}: {_last_line(done.stderr)}",
                        "for a cgmq file: export it with --portable, which writes the types OpenVINO 2026 loads")
    with np.load(outputs) as data:
        outs = [data[k] for k in sorted(data.files, key=lambda name: int(name[3:]))]
    return outs, json.loads(runtime.read_text(encoding="utf-8"))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message"


def _layer(node: str, nodes: list[dict]) -> OpenVinoLayer:
    """The OpenVINO runtime node that executes the ONNX node ``node`` (a compute one first)."""
    hits = [n for n in nodes if any(o == node or o.startswith(node + "/") for o in n["original"])]
    hits.sort(key=lambda n: n["layer_type"] not in COMPUTE_TYPES)
    if not hits:
        return OpenVinoLayer(node=node, layer_type=None, precision=None)
    return OpenVinoLayer(node=node, layer_type=hits[0]["layer_type"], precision=hits[0]["precision"])


def _top1_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    """Percent of rows whose OpenVINO top-1 class is an onnxruntime top-1 class.

    Quantized outputs tie exactly; a class whose onnxruntime value equals the
    row's maximum (within 1e-6 of the row's scale) counts as top-1 as much as
    the one argmax returns (as in :func:`cgmq_cli.export.verify.parity`).
    """
    ref, got = ref.reshape(ref.shape[0], -1), got.reshape(got.shape[0], -1)
    best = ref.max(1)
    picked = np.take_along_axis(ref, got.argmax(1)[:, None], 1)[:, 0]
    tol = 1e-6 * np.maximum(np.abs(ref).max(1), 1.0)
    return 100.0 * float(np.mean(picked >= best - tol))


def compare(path: str | os.PathLike, layer_nodes: list[str]) -> OpenVinoResult:
    """Load ``path`` in OpenVINO (CPU), report each layer's precision there, compare outputs with onnxruntime."""
    require()
    from cgmq_cli.export.lint import load_session

    path = Path(path)
    batches = _inputs(path)
    session = load_session(path)
    name = session.get_inputs()[0].name
    reference = [np.asarray(session.run(None, {name: b})[0]) for b in batches]
    with tempfile.TemporaryDirectory(prefix="cgmq-openvino-") as tmp:
        outs, runtime = _run_worker(path, batches, Path(tmp))
    ref, got = np.concatenate(reference), np.concatenate(outs)
    notes = []
    if ref.shape != got.shape:
        raise CgmqError(f"OpenVINO's output has shape {got.shape}, onnxruntime's {ref.shape}",
                        "please report this file")
    diff = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64)))) if ref.size else 0.0
    if not np.all(np.isfinite(got)):
        notes.append("OpenVINO produced non-finite outputs")
    agreement = _top1_agreement(ref.astype(np.float64), got.astype(np.float64))
    layers = tuple(_layer(n, runtime["nodes"]) for n in layer_nodes)
    return OpenVinoResult(version=str(runtime["version"]).split("-")[0], layers=layers, agreement=agreement,
                          max_abs_diff=diff, examples=int(ref.shape[0]), notes=tuple(notes))
