"""The pipeline as library functions returning plain result objects.

    load model -> prepare (trace, fold BN, insert quantizers, MACs) -> ...

The CLI only parses arguments, calls these functions and renders what comes
back; everything here raises :class:`cgmq_cli.errors.CgmqError` kinds for bad
input and never prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

from cgmq_cli import checkpoint, qmodel
from cgmq_cli.errors import UsageError
from cgmq_cli.profiles import HardwareProfile, load_profile

DEFAULT_IMAGE_SHAPE = (3, 224, 224)


@dataclass(frozen=True)
class ModelRequest:
    """What the user said about the model: MODEL, --arch, --trust-checkpoint, --leaf, --input-shape."""

    model: str
    arch: str | None = None
    trust: bool = False
    leaves: tuple[str, ...] = ()
    input_shape: tuple[int, ...] | None = None  # with batch dim, as typed
    input_dtype: str = "float32"  # float32, or int64 for token ids


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"1,3,224,224"`` -> (1, 3, 224, 224); positive integers, bounded size (see settings.parse_shape)."""
    from cgmq_cli.settings import parse_shape

    return parse_shape(text, "--input-shape")


def sample_shape_for(request: ModelRequest, source: checkpoint.ModelSource) -> tuple[int, ...]:
    """One example's shape: --input-shape (minus batch), else what the file or name implies.

    (compress takes the shape from its data set instead.)
    """
    if request.input_shape is not None:
        return tuple(request.input_shape[1:])
    if source.sample_shape:
        return tuple(source.sample_shape)
    if source.kind == "torchvision" or (source.arch or "").startswith(checkpoint.TORCHVISION):
        return (3, 299, 299) if "inception" in (source.arch or source.model) else DEFAULT_IMAGE_SHAPE
    raise UsageError("the model's input shape is unknown", "pass --input-shape, e.g. --input-shape 1,3,224,224, or --data")


def load(request: ModelRequest) -> tuple[nn.Module, checkpoint.ModelSource]:
    return checkpoint.load_model(request.model, request.arch, request.trust)


def prepare(model: nn.Module, sample_shape: Sequence[int], leaves: Sequence[str], profile: HardwareProfile,
            dtype: str = "float32") -> qmodel.QuantizedModel:
    """Insert quantizers with the widths, signedness and granularity the profile allows.

    ``dtype`` is the input's: ``float32``, or ``int64`` for token ids (a model that starts with an embedding).
    """
    import torch

    return qmodel.prepare(
        model, sample_shape, leaves, input_dtype=getattr(torch, dtype),
        widths_for=profile.widths_for,
        input_bits=profile.input_bits,
        signedness=profile.act_signedness,
        per_channel=profile.weight_granularity == "per-channel",
        integer_ops=profile.integer_ops,
        reduce_range=profile.reduce_range,
        integer_width=profile.integer_width or 8,
    )


@dataclass(frozen=True)
class InspectResult:
    model: str
    sample_shape: tuple[int, ...]
    layers: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    float_ops: list[dict] = field(default_factory=list)  # compute left in float, with the reason

    def as_dict(self) -> dict:
        return {"layers": self.layers, "totals": self.totals, "float_ops": self.float_ops}


def inspect(request: ModelRequest, profile_spec: str | None = None) -> InspectResult:
    """The quantizable layers of a model with their MACs and parameters."""
    from cgmq_cli.settings import check_elements

    profile = load_profile(profile_spec)
    model, source = load(request)
    shape = sample_shape_for(request, source)
    check_elements(tuple(shape), "the example input")
    dtype = source.sample_dtype if request.input_dtype == "float32" else request.input_dtype
    qm = prepare(model, shape, request.leaves, profile, dtype)
    summary = qm.cost()
    layers = [{"name": s.name, "op": s.op, "macs": s.macs, "params": s.params} for s in qm.shapes]
    totals = {"macs": summary.macs, "quantized_macs": summary.quantized_macs, "coverage": summary.coverage,
              "params": summary.params, "float_params": summary.float_params, "bops_fp32": summary.bops_fp32}
    return InspectResult(model=request.model, sample_shape=shape, layers=layers, totals=totals,
                         float_ops=[op.as_dict() for op in qm.float_ops])
