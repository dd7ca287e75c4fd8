"""Runs one ONNX file in OpenVINO (CPU), in its own process: ``python -m cgmq_cli.export.openvino_worker``.

A separate process because OpenVINO can abort the whole process on files it
mishandles (compile_model ends in SIGABRT on some low-bit QDQ patterns); the
caller reports that as one line instead of dying with it.

    argv: MODEL.onnx INPUTS.npz OUTPUTS.npz RUNTIME.json [THREADS]

Reads the arrays of INPUTS.npz (one per model input, in input order, named
``arg0``, ``arg1``, ...), writes the first output of every example batch to
OUTPUTS.npz (``out0``, ...), and the nodes of OpenVINO's runtime model (exec
graph) to RUNTIME.json: their layer type, runtime precision, output precisions
and the original (ONNX-derived) layer names each one executes. Float layers run in f32
(``INFERENCE_PRECISION_HINT``), whatever the CPU's default (bf16 where it has bf16 units).
"""

from __future__ import annotations

import json
import sys


def _text(info, key: str) -> str:
    return info[key].astype(str) if key in info else ""


def main(argv: list[str]) -> int:
    model_path, inputs_path, outputs_path, runtime_path = argv[:4]
    threads = argv[4] if len(argv) > 4 else "1"
    import numpy as np
    import openvino as ov

    core = ov.Core()
    model = core.read_model(model_path)
    # float layers in f32: on CPUs with bf16 (AMX, AVX512-BF16) OpenVINO would otherwise run them in bf16,
    # which measures the CPU's rounding, not the file
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": int(threads), "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    with np.load(inputs_path) as data:
        batches = [data[k] for k in sorted(data.files, key=lambda name: int(name[3:]))]
    outputs = {}
    for i, batch in enumerate(batches):
        result = request.infer({0: batch})
        outputs[f"out{i}"] = np.asarray(result[compiled.outputs[0]])
    np.savez(outputs_path, **outputs)
    nodes = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        nodes.append({"name": op.get_friendly_name(), "layer_type": _text(info, "layerType"),
                      "precision": _text(info, "runtimePrecision"), "outputs": _text(info, "outputPrecisions"),
                      "original": [n for n in _text(info, "originalLayersNames").split(",") if n]})
    with open(runtime_path, "w", encoding="utf-8") as f:
        json.dump({"version": ov.__version__, "nodes": nodes}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
