"""Pure quantization math: integer grids, fake quantization, LSQ, MSE calibration.

Grids are the integer grids that ONNX QuantizeLinear/DequantizeLinear carry
(zero point 0, so zero is always exactly representable)::

    signed b-bit:    q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)
    unsigned b-bit:  q = clamp(round(x / s), 0, 2^b - 1)
    x_q = s * q

``round`` is round-half-to-even (torch.round), the same rule QuantizeLinear
uses, so the exported file reproduces these values bit for bit. Width 32 means
"not quantized": the tensor passes through unchanged.
"""

from __future__ import annotations

import math

import torch

FLOAT_BITS = 32


REDUCED_RANGE = (-64, 63)  # 8-bit weight codes that a u8 x s8 pair sum cannot overflow in 16 bits


def qrange(bits: int, signed: bool, reduced: bool = False) -> tuple[int, int]:
    """Smallest and largest integer code of a ``bits``-wide grid.

    ``reduced`` (8-bit signed only, onnxruntime's ``reduce_range``): the codes
    [-64, 63]. x86 CPUs without VNNI add pairs of u8 x s8 products in a 16-bit
    register (``vpmaddubsw``), which 2 * 255 * 128 overflows and 2 * 255 * 64
    does not.
    """
    if signed:
        if reduced and bits == 8:
            return REDUCED_RANGE
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass; identity gradient (straight-through)."""
    return (torch.round(x) - x).detach() + x


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``factor`` (LSQ).

    Written so that the forward value is exactly ``x`` (``(x - x.detach())`` is an
    exact zero); ``(x - x * factor).detach() + x * factor`` can be one ulp off,
    which would make the training grid differ from the exported scale.
    """
    return x.detach() + (x - x.detach()) * factor


def lsq_grad_factor(numel: int, qmax: int) -> float:
    """LSQ step-gradient scale 1 / sqrt(N * q_max) (Esser et al., 2020)."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qmax, 1))


def fake_quant(x: torch.Tensor, step: torch.Tensor, qmin, qmax) -> torch.Tensor:
    """``step * clamp(round(x / step), qmin, qmax)`` with straight-through rounding.

    Clamping happens before rounding (same values, since the bounds are integers)
    so that the gradient w.r.t. ``x`` is 1 inside the range and 0 outside, and
    the gradient w.r.t. ``step`` is the LSQ one.

    With an integer zero point z the grid is ``step * (q - z)`` for codes q in
    [qmin, qmax], i.e. this function with the bounds ``qmin - z, qmax - z``
    (ONNX rounds ``x / step`` before adding z, so the values agree exactly).
    The bounds may be tensors, so that a learned z gets a gradient.
    """
    return round_ste(torch.clamp(x / step, qmin, qmax)) * step


def quantize_codes(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, zero_point: int = 0) -> torch.Tensor:
    """The integer codes (as int64) that QuantizeLinear would produce: clamp(round(x / s) + z)."""
    return torch.clamp(torch.round(x / step) + zero_point, qmin, qmax).to(torch.int64)


def channel_view(step: torch.Tensor, ndim: int, axis: int = 0) -> torch.Tensor:
    """Reshape a per-channel step of shape (C,) to broadcast along ``axis`` of an ``ndim`` tensor."""
    if step.ndim == 0 or ndim == 0:
        return step
    shape = [1] * ndim
    shape[axis] = -1
    return step.reshape(shape)


def _best_alpha(rows, top, alphas, qmin, qmax, best_err, best_alpha):
    for alpha in alphas:
        step = (alpha * top / qmax)[:, None]
        err = (quantize_codes(rows, step, qmin, qmax) * step - rows).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_alpha = torch.where(better, alpha, best_alpha)
    return best_err, best_alpha


def mse_optimal_step(
    x: torch.Tensor,
    bits: int,
    signed: bool,
    per_channel: bool,
    n_grid: int = 25,
    qmax: int | None = None,
) -> torch.Tensor:
    """Step minimising the quantization MSE over clipping fractions of max|x|.

    ``s = alpha * max|x| / q_max`` with ``alpha`` in (0, 1], searched on a coarse
    grid of ``n_grid`` points and then a fine grid of ``n_grid`` points around
    the best one (resolution 1/n_grid^2). Returns a scalar, or a (C,) vector over
    dim 0 when ``per_channel``. Max-based steps (alpha = 1) waste most of a 2- or
    4-bit grid on rare outliers; the MSE choice clips them.
    """
    x = x.detach().float()
    rows = x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)
    qmin, full_max = qrange(bits, signed)
    if qmax is not None and qmax != full_max:  # a narrowed grid (reduce_range): symmetric around zero
        qmin = -qmax - 1 if signed else 0
    else:
        qmax = full_max
    top = rows.abs().amax(dim=1) if signed else rows.clamp(min=0).amax(dim=1)
    top = torch.where(top > 0, top, torch.ones_like(top))
    err = torch.full_like(top, float("inf"))
    alpha = torch.ones_like(top)
    grid = torch.linspace(1.0 / n_grid, 1.0, n_grid, device=x.device)
    err, alpha = _best_alpha(rows, top, grid, qmin, qmax, err, alpha)
    offsets = torch.linspace(-1.0 / n_grid, 1.0 / n_grid, n_grid, device=x.device)
    fine = (alpha[None, :] + offsets[:, None]).clamp(1.0 / n_grid**2, 1.0)
    err, alpha = _best_alpha(rows, top, fine, qmin, qmax, err, alpha)
    step = alpha * top / qmax
    return step if per_channel else step[0]


def max_step(x: torch.Tensor, bits: int, signed: bool, per_channel: bool) -> torch.Tensor:
    """The plain max-based step ``max|x| / q_max`` (baseline for the MSE choice)."""
    rows = x.detach().reshape(x.shape[0], -1) if per_channel else x.detach().reshape(1, -1)
    top = rows.abs().amax(dim=1) if signed else rows.clamp(min=0).amax(dim=1)
    top = torch.where(top > 0, top, torch.ones_like(top))
    step = top / qrange(bits, signed)[1]
    return step if per_channel else step[0]


def mse_optimal_asymmetric(x: torch.Tensor, bits: int, n_grid: int = 25) -> tuple[torch.Tensor, int]:
    """(step, zero point) of an unsigned ``bits`` grid with a zero point for data of both signs.

    The clipping range [alpha * min, alpha * max] is searched on the same
    coarse-then-fine grid of ``alpha`` as :func:`mse_optimal_step`;
    ``s = (hi - lo) / q_max`` and ``z = round(-lo / s)`` (zero stays exact).
    """
    x = x.detach().float().reshape(-1)
    qmax = 2**bits - 1
    low, high = float(x.min().clamp(max=0)), float(x.max().clamp(min=0))
    if high - low <= 0:
        return torch.tensor(1.0), 0

    def error(alpha: float) -> tuple[float, float, int]:
        step = alpha * (high - low) / qmax
        zero = int(min(max(round(-alpha * low / step), 0), qmax))
        codes = torch.clamp(torch.round(x / step) + zero, 0, qmax)
        return float((step * (codes - zero) - x).pow(2).mean()), step, zero

    coarse = [i / n_grid for i in range(1, n_grid + 1)]
    best = min((error(a) + (a,) for a in coarse), key=lambda r: r[0])
    fine = [min(max(best[3] + (i - n_grid // 2) / n_grid**2, 1.0 / n_grid**2), 1.0) for i in range(n_grid)]
    best = min([best] + [error(a) + (a,) for a in fine], key=lambda r: r[0])
    return torch.tensor(best[1]), best[2]
