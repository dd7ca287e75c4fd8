"""Deployment benchmark: do cgmq's exported files run fast where they are deployed?

Not part of the test run. For torchvision resnet18 and mobilenet_v2 (random
weights, seed 0, 10 classes, input 3x112x112), in one process, 1 thread:

* float ONNX (cgmq's float export: BatchNorm folded, the same graph);
* cgmq int8-cpu: ``api.prepare(model, shape, (), load_profile("int8-cpu"))``,
  calibrated on 64 random images, every width 8, ``export_qdq``;
* onnxruntime's ``quantize_static`` on that float file, calibrated on the same
  images: its defaults (QDQ, int8 activations and weights, per tensor) and
  U8S8 per channel (uint8 activations, int8 weights, per channel);
* a low-bit cgmq file (generic profile, 4-bit weights and activations, 8-bit
  network input) in onnxruntime with and without ``session.disable_quant_qdq``;
* OpenVINO (CPU, 1 thread) for the same files, when it is installed.

Latency: batch 1 and 16; every round runs each session once, in an order that
rotates per round (alternated, so drift on the shared machine hits all files
alike); medians over the rounds. Kernel counts: op types of onnxruntime's
optimized graph (``optimized_model_filepath``). Parity: top-1 agreement of
each cgmq file with the PyTorch quantized model on 256 random images. BOPs:
read back from the file with ``cgmq verify``'s reader, next to the cost model.

    python benchmarks/deploy.py                      # about 10-20 minutes on 2 shared cores
    python benchmarks/deploy.py --models resnet18 --rounds 5   # quick look
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cgmq_cli import api  # noqa: E402
from cgmq_cli.export import onnx_qdq, openvino, verify  # noqa: E402
from cgmq_cli.profiles import load_profile  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
INTEGER = {"QLinearConv", "QLinearAdd", "QGemm", "QLinearMatMul", "QLinearConcat", "QLinearAveragePool",
           "QLinearGlobalAveragePool", "MatMulIntegerToFloat", "NhwcQLinearConv"}
FLOAT_COMPUTE = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "Add", "NchwcConv"}


def cpu_description() -> dict:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "avx_vnni_int8"})
    return {"model": model, "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "vnni": vnni, "note": "other jobs share the cores; compare ratios within this file"}


def images(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, num_classes=10).eval()


def prepared(model: torch.nn.Module, shape, profile: str, calib: torch.Tensor, bits: int | None):
    qm = api.prepare(model, shape, (), load_profile(profile))
    qm.calibrate(calib)
    if bits is not None:
        qs = qm.tensor_quantizers()
        qm.set_widths({k: bits if bits in q.allowed else q.allowed[0] for k, q in qs.items()})
    return qm


def quantize_static(float_path: Path, out: Path, calib: torch.Tensor, u8s8_per_channel: bool) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as qs

    name = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: calib[i:i + 1].numpy()} for i in range(len(calib))])

        def get_next(self):
            return next(self.batches, None)

    kwargs = dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True) \
        if u8s8_per_channel else {}
    qs(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, **kwargs)


def ort_session(path: Path, disable_qdq: bool = False, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if disable_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def kernels(path: Path, tmp: Path, disable_qdq: bool = False) -> dict[str, int]:
    out = tmp / f"{path.stem}{'-noqdq' if disable_qdq else ''}.opt.onnx"
    ort_session(path, disable_qdq, out)
    counts = collections.Counter(n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node)
    return dict(sorted(counts.items()))


def ov_runner(path: Path):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})


def ov_int8_layers(path: Path) -> dict[str, int]:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": 1})
    counts: collections.Counter = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else ""
        if kind in openvino.COMPUTE_TYPES:
            precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else ""
            counts["int8" if precision in openvino.INT8_PRECISIONS else "float"] += 1
    return dict(counts)


def alternated(runners: dict[str, callable], x: np.ndarray, rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per runner; each round runs every runner once, the order rotating per round."""
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name](x)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            runners[name](x)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def ort_runner(session: ort.InferenceSession):
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def bench_model(name: str, shape: tuple[int, ...], rounds: dict[int, int], tmp: Path, log) -> dict:
    model = build(name)
    calib, test = images(64, shape, 1), images(256, shape, 2)
    parity_inputs = list(test.split(32))
    files: dict[str, Path] = {}
    result: dict = {"model": name, "input": list(shape)}

    log(f"[{name}] cgmq int8-cpu (every width 8)")
    qm8 = prepared(model, shape, "int8-cpu", calib, 8)
    info8 = onnx_qdq.export_qdq(qm8, tmp / f"{name}-cgmq-int8.onnx", parity_inputs=parity_inputs, min_agreement=0.0)
    files["cgmq int8-cpu"] = info8.path
    log(f"[{name}] float")
    files["float"] = onnx_qdq.export_float(qm8, tmp / f"{name}-float.onnx").path
    log(f"[{name}] quantize_static (defaults, U8S8 per channel)")
    files["quantize_static defaults"] = tmp / f"{name}-qs-default.onnx"
    quantize_static(files["float"], files["quantize_static defaults"], calib, u8s8_per_channel=False)
    files["quantize_static U8S8 per-channel"] = tmp / f"{name}-qs-u8s8.onnx"
    quantize_static(files["float"], files["quantize_static U8S8 per-channel"], calib, u8s8_per_channel=True)
    log(f"[{name}] cgmq 4-bit (generic profile)")
    qm4 = prepared(model, shape, "generic", calib, 4)
    info4 = onnx_qdq.export_qdq(qm4, tmp / f"{name}-cgmq-4bit.onnx", parity_inputs=parity_inputs, min_agreement=0.0)
    info4p = onnx_qdq.export_qdq(qm4, tmp / f"{name}-cgmq-4bit-portable.onnx", opset=onnx_qdq.PORTABLE_OPSET,
                                 portable=True, parity_inputs=parity_inputs, min_agreement=0.0)
    files["cgmq 4-bit"] = info4.path

    read8, read4 = verify.read_widths(info8.path, runtime=False), verify.read_widths(info4.path, runtime=False)
    result["cgmq"] = {
        "int8-cpu": {"bops_read_back": read8.bops, "bops_cost_model": qm8.cost().bops,
                     "rel_bops": qm8.cost().rel_bops, "parity_top1": info8.parity.agreement,
                     "max_abs_logit_diff": info8.parity.max_abs_diff, "parity_examples": info8.parity.n,
                     "integer_kernels": f"{sum(f.integer for f in info8.kernels)} of {len(info8.kernels)}"},
        "4-bit": {"bops_read_back": read4.bops, "bops_cost_model": qm4.cost().bops, "rel_bops": qm4.cost().rel_bops,
                  "parity_top1": info4.parity.agreement, "parity_top1_portable": info4p.parity.agreement}}
    result["kernels"] = {label: kernels(path, tmp) for label, path in files.items()}
    result["kernels"]["cgmq 4-bit, disable_quant_qdq"] = kernels(files["cgmq 4-bit"], tmp, disable_qdq=True)
    float_kernels = result["kernels"]["float"]
    result["float_compute_nodes"] = {k: v for k, v in float_kernels.items() if k in FLOAT_COMPUTE}
    result["cgmq_float_compute_left"] = {k: v for k, v in result["kernels"]["cgmq int8-cpu"].items()
                                         if k in FLOAT_COMPUTE}

    sessions = {label: ort_runner(ort_session(path)) for label, path in files.items()}
    sessions["cgmq 4-bit, disable_quant_qdq"] = ort_runner(ort_session(files["cgmq 4-bit"], disable_qdq=True))
    result["onnxruntime_ms"] = {}
    for batch, n in rounds.items():
        log(f"[{name}] onnxruntime latency, batch {batch}, {n} rounds")
        x = images(batch, shape, 3).numpy()
        result["onnxruntime_ms"][str(batch)] = alternated(sessions, x, n)
    result["ratios"] = {}
    for batch, ms in result["onnxruntime_ms"].items():
        result["ratios"][batch] = {
            "cgmq / quantize_static U8S8 per-channel": ms["cgmq int8-cpu"] / ms["quantize_static U8S8 per-channel"],
            "cgmq / quantize_static defaults": ms["cgmq int8-cpu"] / ms["quantize_static defaults"],
            "cgmq int8 / float": ms["cgmq int8-cpu"] / ms["float"],
            "cgmq 4-bit / float": ms["cgmq 4-bit"] / ms["float"],
            "cgmq 4-bit disable_quant_qdq / default": ms["cgmq 4-bit, disable_quant_qdq"] / ms["cgmq 4-bit"]}

    if openvino.available():
        ov_files = {"float": files["float"], "cgmq int8-cpu": files["cgmq int8-cpu"],
                    "quantize_static U8S8 per-channel": files["quantize_static U8S8 per-channel"],
                    "cgmq 4-bit (--portable)": info4p.path}
        runners = {label: ov_runner(path) for label, path in ov_files.items()}
        result["openvino_ms"] = {}
        for batch, n in rounds.items():
            log(f"[{name}] OpenVINO latency, batch {batch}, {n} rounds")
            x = images(batch, shape, 3).numpy()
            result["openvino_ms"][str(batch)] = alternated(runners, x, n)
        result["openvino_compute_layers"] = {label: ov_int8_layers(path) for label, path in ov_files.items()}
    return result


def markdown(report: dict) -> str:
    cpu = report["cpu"]
    lines = ["# Deployment benchmark", "",
             f"`python benchmarks/deploy.py` ({report['date']}); onnxruntime {report['onnxruntime']}, "
             f"OpenVINO {report.get('openvino') or 'not installed'}, torch {report['torch']}.", "",
             f"CPU: {cpu['model']}, {cpu['cores']} cores, AVX2 {'yes' if cpu['avx2'] else 'no'}, "
             f"AVX-512 {'yes' if cpu['avx512'] else 'no'}, VNNI {'yes' if cpu['vnni'] else 'no'}; "
             f"{cpu['note']}. 1 thread; medians of alternated runs "
             f"({report['rounds']['1']} rounds at batch 1, {report['rounds']['16']} at batch 16).", ""]
    for res in report["results"]:
        name = res["model"]
        lines += [f"## {name}, input {'x'.join(map(str, res['input']))}, random weights", ""]
        lines += ["| file | onnxruntime batch 1 (ms) | batch 16 (ms) | integer kernels after ORT's optimiser |",
                  "|---|---|---|---|"]
        ms = res["onnxruntime_ms"]
        for label in ms["1"]:
            kern = res["kernels"].get(label, {})
            integer = ", ".join(f"{k} {v}" for k, v in kern.items() if k in INTEGER) or "none"
            lines.append(f"| {label} | {ms['1'][label]:.2f} | {ms['16'][label]:.2f} | {integer} |")
        lines += ["", "| ratio | batch 1 | batch 16 |", "|---|---|---|"]
        for key in res["ratios"]["1"]:
            lines.append(f"| {key} | {res['ratios']['1'][key]:.3f} | {res['ratios']['16'][key]:.3f} |")
        c8, c4 = res["cgmq"]["int8-cpu"], res["cgmq"]["4-bit"]
        left = ", ".join(f"{k} {v}" for k, v in res["cgmq_float_compute_left"].items()) or "none"
        lines += ["",
                  f"- cgmq int8-cpu: {c8['integer_kernels']} promised ops are integer kernels; float compute left "
                  f"after ORT's optimiser: {left} (float file: "
                  + ", ".join(f"{k} {v}" for k, v in res["float_compute_nodes"].items()) + ").",
                  f"- parity with the PyTorch quantized model ({c8['parity_examples']} random images): int8 "
                  f"{c8['parity_top1']:.2f} % top-1 (max |logit diff| {c8['max_abs_logit_diff']:.3g}); 4-bit "
                  f"{c4['parity_top1']:.2f} % (portable file {c4['parity_top1_portable']:.2f} %).",
                  f"- BOPs read back = cost model: int8 {c8['bops_read_back']:,} = {c8['bops_cost_model']:,} "
                  f"({c8['rel_bops']:.2f} % of 32x32); 4-bit {c4['bops_read_back']:,} = {c4['bops_cost_model']:,}.",
                  ""]
        if "openvino_ms" in res:
            ov = res["openvino_ms"]
            lines += ["| OpenVINO CPU | batch 1 (ms) | batch 16 (ms) | compute layers int8 / float |", "|---|---|---|---|"]
            for label in ov["1"]:
                layers = res["openvino_compute_layers"][label]
                lines.append(f"| {label} | {ov['1'][label]:.2f} | {ov['16'][label]:.2f} | "
                             f"{layers.get('int8', 0)} / {layers.get('float', 0)} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--shape", default="3,112,112")
    parser.add_argument("--rounds", type=int, default=100, help="rounds at batch 1 (a quarter of them at batch 16)")
    parser.add_argument("--out", default=str(RESULTS / "deploy"), help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = tuple(int(v) for v in args.shape.split(","))
    rounds = {1: args.rounds, 16: max(3, args.rounds // 4)}
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_description(), "onnxruntime": ort.__version__,
              "torch": torch.__version__, "rounds": {str(k): v for k, v in rounds.items()},
              "openvino": None, "results": []}
    if openvino.available():
        import openvino as ov

        report["openvino"] = ov.__version__.split("-")[0]
    with tempfile.TemporaryDirectory(prefix="cgmq-deploy-") as tmp:
        for name in args.models.split(","):
            report["results"].append(bench_model(name, shape, rounds, Path(tmp), log))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
