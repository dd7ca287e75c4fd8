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


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Smallest and largest integer code of a ``bits``-wide grid."""
    if signed:
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


def fake_quant(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``step * clamp(round(x / step), qmin, qmax)`` with straight-through rounding.

    Clamping happens before rounding (same values, since the bounds are integers)
    so that the gradient w.r.t. ``x`` is 1 inside the range and 0 outside, and
    the gradient w.r.t. ``step`` is the LSQ one.
    """
    return round_ste(torch.clamp(x / step, qmin, qmax)) * step


def quantize_codes(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The integer codes (as int64) that QuantizeLinear would produce."""
    return torch.clamp(torch.round(x / step), qmin, qmax).to(torch.int64)


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
    qmin, qmax = qrange(bits, signed)
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
