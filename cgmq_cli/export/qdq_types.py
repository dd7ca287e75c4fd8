"""Integer widths <-> ONNX QuantizeLinear/DequantizeLinear element types, per opset.

Native types (zero point 0, the grids of :mod:`cgmq_cli.quant.functional`)::

    width   signed  unsigned  first opset
    2       INT2    UINT2     25
    4       INT4    UINT4     21
    8       INT8    UINT8     13   (per-axis DequantizeLinear)
    16      INT16   UINT16    21
    32      float, no Q/DQ

Below a width's first opset it travels in a *container*, a wider type whose
range is narrowed to the width's grid:

* opset 21-24, 2 bits -> INT4/UINT4 container;
* opset 13-20, 2 and 4 bits -> INT8/UINT8 container;
* 16 bits below opset 21 has no standard container (QuantizeLinear cannot
  produce int16 or int32 there) -> :class:`ExportError`.

How a container's range is declared (and read back by ``cgmq verify``):

* activations: INT8/UINT8 containers put an integer ``Clip(lo, hi)`` between
  QuantizeLinear and DequantizeLinear; INT4/UINT4 containers put a float range
  guard ``Max(x, lo*s) -> Min(., hi*s)`` right before QuantizeLinear, so the
  codes it produces lie in [lo, hi]. (Not a float Clip: onnxruntime 1.32's
  Clip->QuantizeLinear fusion throws on 4- and 2-bit zero points.) Both are
  real operators, so the range holds in every runtime and verify reads it from
  the graph alone.
* weights: the codes are constants already in [lo, hi]; the DequantizeLinear
  node carries the node metadata ``cgmq.range = "lo,hi"``. Verify trusts the
  marker only when every stored code lies inside it.

Portable files (``cgmq export --portable``): opset 21, so 2-bit tensors travel
in int4/uint4 (OpenVINO 2026 cannot load the opset-25 int2/uint2 types), and an
activation narrower than 8 bits that a layer with 8-bit weights reads travels
in an 8-bit container with an integer Clip (OpenVINO 2026.4's compile_model
aborts on a uint4 activation feeding a MatMul/Gemm with int8 weights).

The same float range guard (a no-op on the grid: QuantizeLinear saturates to
the same bounds) is how cgmq keeps onnxruntime's QDQ fusions away from widths
it has no kernels for. onnxruntime 1.32 (CPU, default options) has integer
kernels only for 8-bit, but some of its QDQ passes accept other types and
then fail at load time, measured:

1. it moves a Q backward through MaxPool / Reshape (Flatten) / Slice and runs
   those ops on the quantized type (no 2- and 4-bit kernels);
2. it fuses ``DQ -> Conv -> [Relu] -> Q`` with 2-bit input and output into a
   QLinearConv, which rejects the type;
3. it fuses ``DQ(8-bit) -> Conv/MatMul <- DQ(int2 weight)`` followed by an
   8-bit Q into QLinearConv / QLinearMatMul, which reject the int2 weight.

So a guard goes before *every* activation QuantizeLinear whose width is not 8
(stops 1 and 2), and after the DequantizeLinear of an 8-bit input whose
layer's weight is not int8 (stops 3; those layers have no integer kernel
anyway). Layers with int8 weights and 8-bit inputs keep the plain pattern, so
onnxruntime's integer kernels still apply to them. The price is two
elementwise ops per guarded tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto as TP

from cgmq_cli.errors import ExportError
from cgmq_cli.quant.functional import FLOAT_BITS, qrange

RANGE_KEY = "cgmq.range"
MIN_OPSET = 13
NATIVE_TYPES: dict[tuple[int, bool], int] = {
    (2, True): TP.INT2, (2, False): TP.UINT2,
    (4, True): TP.INT4, (4, False): TP.UINT4,
    (8, True): TP.INT8, (8, False): TP.UINT8,
    (16, True): TP.INT16, (16, False): TP.UINT16,
}
FIRST_OPSET = {2: 25, 4: 21, 8: MIN_OPSET, 16: 21}

# Element type -> (bits, signed) for reading any QDQ file. Float 8/4-bit types
# count at their storage width; INT32 (biases) at 32.
TYPE_BITS: dict[int, tuple[int, bool]] = {
    **{t: (b, s) for (b, s), t in NATIVE_TYPES.items()},
    TP.INT32: (32, True), TP.UINT32: (32, False),
    TP.FLOAT8E4M3FN: (8, True), TP.FLOAT8E4M3FNUZ: (8, True),
    TP.FLOAT8E5M2: (8, True), TP.FLOAT8E5M2FNUZ: (8, True),
    TP.FLOAT4E2M1: (4, True),
}
INTEGER_TYPES = frozenset(NATIVE_TYPES.values()) | {TP.INT32, TP.UINT32}
FLOAT_BYTES: dict[int, float] = {TP.FLOAT: 4, TP.FLOAT16: 2, TP.BFLOAT16: 2, TP.DOUBLE: 8}


@dataclass(frozen=True)
class Storage:
    """How one quantized tensor is stored: its true grid and its ONNX type."""

    bits: int
    signed: bool
    elem_type: int  # the ONNX element type of the codes (native or container)
    container_bits: int  # == bits when native

    @property
    def is_container(self) -> bool:
        return self.container_bits != self.bits

    @property
    def grid(self) -> tuple[int, int]:
        return qrange(self.bits, self.signed)

    @property
    def type_name(self) -> str:
        return TP.DataType.Name(self.elem_type).lower()

    @property
    def clip(self) -> str | None:
        """"int" (Clip between Q and DQ), "float" (Max/Min guard before Q) or None."""
        if not self.is_container:
            return None
        return "int" if self.container_bits == 8 else "float"


def storage(bits: int, signed: bool, opset: int, what: str = "tensor", container: int = 0) -> Storage | None:
    """The storage of a ``bits``-wide tensor in an ``opset`` file; None for float (32 bits).

    ``container`` asks for at least that many bits of storage (``--portable``:
    8 for an activation read by a layer with 8-bit weights).
    """
    if bits >= FLOAT_BITS:
        return None
    if (bits, signed) not in NATIVE_TYPES:
        raise ExportError(f"{what}: {bits}-bit tensors have no ONNX integer type",
                          "use widths 2, 4, 8, 16 or 32")
    if bits < container <= 8:
        return Storage(bits, signed, NATIVE_TYPES[(container, signed)], container)
    if opset >= FIRST_OPSET[bits]:
        return Storage(bits, signed, NATIVE_TYPES[(bits, signed)], bits)
    if bits == 16:
        raise ExportError(f"{what} is 16-bit, which needs opset 21 or newer (--opset {opset})",
                          "export with --opset 21 or higher")
    container = 4 if opset >= FIRST_OPSET[4] else 8
    return Storage(bits, signed, NATIVE_TYPES[(container, signed)], container)


def bits_for_range(lo: int, hi: int, signed: bool) -> int:
    """The narrowest grid of the given signedness that holds every code in [lo, hi]."""
    bits = 1
    while True:
        qmin, qmax = qrange(bits, signed)
        if qmin <= lo and hi <= qmax:
            return bits
        bits += 1


def parse_range(text: str) -> tuple[int, int] | None:
    """Parse a ``cgmq.range`` marker ``"lo,hi"``; None when malformed."""
    try:
        lo, hi = (int(part) for part in text.split(","))
    except ValueError:
        return None
    return (lo, hi) if lo <= hi else None
