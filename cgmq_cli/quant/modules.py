"""GatedQuantizer: learned steps per width plus one gate variable per tensor.

The gate ``g`` lives on a log2 scale: the width is the allowed width nearest to
``2^g`` (``g = 1`` means 2 bits, ``3`` means 8, ``5`` means 32 = pass-through).
Every allowed width below 32 keeps its own learned step (LSQ, stored as log s),
so a gate that switches width finds a calibrated step waiting.

In probe mode (gate epochs) the forward value is unchanged, but two
straight-through terms make autograd deliver the first-order loss change of a
width move into ``.grad``::

    out = Q_b(x) + (g - g.detach()) * e_up + (p - p.detach()) * e_down
    e_up   = Q_next(x) - Q_b(x)           (at the top width: Q_b(x) - Q_prev(x))
    e_down = Q_prev(x) - Q_b(x)           (0 at the lowest width)
    g.grad = <dL/dQ, e_up>,   p.grad = <dL/dQ, e_down>

so ``g.grad < 0`` means more bits would lower the loss, and ``p.grad`` is the
predicted loss increase of halving the width.

The finish after a gate epoch needs the loss change of a move to *any*
allowed width (repair may skip a halving that saves nothing). In table mode
(:meth:`GatedQuantizer.start_table`) the forward value is again unchanged and::

    out = Q_b(x) + sum_{w != b} (t_w - t_w.detach()) * (Q_w(x) - Q_b(x))
    t.grad[w]    = <dL/dQ, Q_w(x) - Q_b(x)>            (Q_32(x) = x)
    table_sq[w] += sum((dL/dQ * (Q_w(x) - Q_b(x)))^2)   (a backward hook on ``out``)

one entry per allowed width (0 at the current one). The first is the
first-order change; the second, times B/2 for a loss averaged over a batch of
B examples, is the second-order term with the diagonal empirical Fisher in
place of the Hessian. Near a minimum the first-order term is mostly noise
(on LeNet-5 it predicted that 2-bit weights *lower* the loss), so the finish
uses both (:func:`cgmq_cli.probes.predict`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from cgmq_cli.quant import functional as F

ACT_CALIBRATION_SAMPLES = 1 << 18


class GatedQuantizer(nn.Module):
    """Fake-quantizer of one tensor (a layer's weight, or an activation tensor read by one or more ops).

    ``signedness`` of activations: ``auto`` (unsigned grid when calibration
    data is never negative, else the signed one), ``unsigned``, ``signed``, or
    ``asymmetric`` (the unsigned grid, with an integer zero point learned per
    width when the data has both signs: ``x_q = s * (q - z)``, the uint8 form
    onnxruntime's integer kernels take). ``reduced`` narrows 8-bit weights to
    [-64, 63] (see :func:`cgmq_cli.quant.functional.qrange`); ``upper`` is a
    known upper bound of the tensor (e.g. 6 after ReLU6) that caps the range.
    """

    def __init__(
        self,
        kind: str,
        allowed: Sequence[int],
        channels: int | None = None,
        signedness: str = "auto",
        reduced: bool = False,
        upper: float | None = None,
        axis: int = 0,
    ) -> None:
        super().__init__()
        if kind not in ("weight", "act"):
            raise ValueError(f"kind must be 'weight' or 'act', got {kind!r}")
        self.kind = kind
        self.allowed = tuple(sorted(set(int(b) for b in allowed)))
        self.per_channel = channels is not None
        self.signedness = "signed" if kind == "weight" else signedness
        self.reduced = bool(reduced) and kind == "weight"
        self.upper = upper
        self.axis = axis  # the channel axis of a per-channel weight (0: output channels first)
        shape = (channels,) if channels is not None else ()
        widths = [b for b in self.allowed if b < F.FLOAT_BITS]
        self.steps = nn.ParameterDict({str(b): nn.Parameter(torch.zeros(shape)) for b in widths})
        self.zero_points = nn.ParameterDict(
            {str(b): nn.Parameter(torch.zeros(())) for b in widths} if self.signedness == "asymmetric" else {})
        self.gate = nn.Parameter(torch.tensor(math.log2(self.allowed[-1])), requires_grad=False)
        self.down_probe = nn.Parameter(torch.tensor(0.0), requires_grad=False)
        self.register_buffer("signed", torch.tensor(self.signedness == "signed"))
        self.register_buffer("has_zero_point", torch.tensor(False))  # asymmetric and the data has both signs
        self.probing = False
        self.table: torch.Tensor | None = None  # table mode: one probe per allowed width (not saved)
        self.table_sq: torch.Tensor | None = None  # table mode: the second-order sums beside it

    # -- width -----------------------------------------------------------------
    @property
    def bits(self) -> int:
        """The allowed width nearest to 2^g on the log2 scale (ties go to fewer bits)."""
        g = float(self.gate.detach())
        return min(self.allowed, key=lambda b: (abs(math.log2(b) - g), b))

    def set_bits(self, bits: int) -> None:
        if bits not in self.allowed:
            raise ValueError(f"{bits} bits not in allowed set {self.allowed}")
        with torch.no_grad():
            self.gate.fill_(math.log2(bits))

    def neighbour(self, direction: int) -> int | None:
        """The next wider (+1) or narrower (-1) allowed width, or None at the end."""
        i = self.allowed.index(self.bits) + direction
        return self.allowed[i] if 0 <= i < len(self.allowed) else None

    def clamp_gate(self) -> None:
        with torch.no_grad():
            self.gate.clamp_(math.log2(self.allowed[0]), math.log2(self.allowed[-1]))

    # -- quantization ----------------------------------------------------------
    @property
    def is_signed(self) -> bool:
        return bool(self.signed)

    def grid(self, bits: int) -> tuple[int, int]:
        """The integer codes [qmin, qmax] of a width (before the zero point)."""
        return F.qrange(bits, self.is_signed, self.reduced)

    def step(self, bits: int) -> torch.Tensor:
        """The positive step of a width. Steps are stored as log(s), so that an
        optimiser's learning rate is a relative change and s can never reach zero.
        With ``upper`` the range ``s * q_max`` stays (just) inside [0, upper]."""
        step = self.steps[str(bits)].exp()
        if self.upper is not None:
            step = torch.clamp(step, max=self.upper / self.grid(bits)[1] * (1 - 1e-6))
        return step

    def zero_point(self, bits: int) -> torch.Tensor:
        """The integer zero point of a width (0 without one); straight-through rounded."""
        if not bool(self.has_zero_point) or str(bits) not in self.zero_points:
            return torch.zeros(())
        qmin, qmax = self.grid(bits)
        return torch.clamp(F.round_ste(self.zero_points[str(bits)]), qmin, qmax)

    def zero_point_value(self, bits: int) -> int:
        return int(self.zero_point(bits).detach())

    def quantize(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        """Q_bits(x): fake-quantized values on the width's integer grid (STE, LSQ)."""
        if bits >= F.FLOAT_BITS:
            return x
        qmin, qmax = self.grid(bits)
        step = self.step(bits)
        per_step = x.numel() // max(step.numel(), 1)
        step = F.scale_grad(step, F.lsq_grad_factor(per_step, qmax))
        if bool(self.has_zero_point):
            z = self.zero_point(bits).to(x.device)
            return F.fake_quant(x, step, qmin - z, qmax - z)
        return F.fake_quant(x, F.channel_view(step, x.ndim, self.axis), qmin, qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantizer math always runs in float32, also under autocast (--amp)."""
        if x.dtype != torch.float32 and x.is_floating_point():
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x.float())
        return self._forward(x)

    def start_table(self) -> None:
        """Table mode: ``table.grad[i]`` accumulates the first-order loss change of moving to ``allowed[i]``,
        ``table_sq[i]`` the sum of squares behind the second-order term."""
        self.table = torch.zeros(len(self.allowed), dtype=torch.float64, device=self.gate.device, requires_grad=True)
        self.table_sq = torch.zeros(len(self.allowed), dtype=torch.float64, device=self.gate.device)

    def stop_table(self) -> None:
        self.table = self.table_sq = None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.bits
        q = self.quantize(x, bits)
        if self.table is not None:
            return self._table_forward(x, q, bits)
        if not self.probing:
            return q
        with torch.no_grad():
            up, down = self.neighbour(+1), self.neighbour(-1)
            if up is not None:
                e_up = self.quantize(x, up) - q
            elif down is not None:
                e_up = q - self.quantize(x, down)
            else:
                e_up = torch.zeros_like(q)
            e_down = self.quantize(x, down) - q if down is not None else torch.zeros_like(q)
        g, p = self.gate, self.down_probe
        return q + (g - g.detach()) * e_up + (p - p.detach()) * e_down

    def _table_forward(self, x: torch.Tensor, q: torch.Tensor, bits: int) -> torch.Tensor:
        t = self.table.to(q.dtype)
        out = q
        for i, width in enumerate(self.allowed):
            if width != bits:
                with torch.no_grad():
                    e = self.quantize(x, width) - q
                out = out + (t[i] - t[i].detach()) * e
        if out.requires_grad:  # the residuals are recomputed in backward rather than kept (activation-sized)
            out.register_hook(lambda grad, x=x.detach(), q=q.detach(): self._accumulate_sq(grad, x, q, bits))
        return out

    @torch.no_grad()
    def _accumulate_sq(self, grad: torch.Tensor, x: torch.Tensor, q: torch.Tensor, bits: int) -> None:
        if self.table_sq is None:
            return
        for i, width in enumerate(self.allowed):
            if width != bits:
                self.table_sq[i] += float(((grad * (self.quantize(x, width) - q)) ** 2).sum())

    # -- calibration -----------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, widths: Sequence[int] | None = None) -> None:
        """Initialise every width's step (and zero point) by minimising the quantization MSE on ``x``.

        ``x`` is the weight itself, or a calibration batch of inputs (flattened
        and subsampled to a fixed size). With signedness "auto", activations that
        were never negative get the unsigned grid; with "asymmetric" they get a
        zero point of 0 (and no zero point is learned) unless the data has both signs.
        With ``widths`` only those widths' steps are set again (the grid's sign stays as it is):
        a width that becomes active late gets a step fitted to the tensor as it is now.
        """
        x = x.detach().float()
        if self.per_channel and self.axis != 0:
            x = x.movedim(self.axis, 0)
        if self.upper is not None:
            x = x.clamp(max=self.upper)
        if self.kind == "act":
            x = x.reshape(-1)
            if x.numel() > ACT_CALIBRATION_SAMPLES:
                gen = torch.Generator().manual_seed(0)
                idx = torch.randperm(x.numel(), generator=gen)[:ACT_CALIBRATION_SAMPLES]
                x = x[idx.to(x.device)]
            if widths is None and self.signedness == "auto":
                self.signed.fill_(bool((x < 0).any()))
            # asymmetric: a zero point only for data of both signs; else the plain unsigned grid
            if widths is None:
                self.has_zero_point.fill_(self.signedness == "asymmetric" and bool((x < 0).any()))
        for key, param in self.steps.items():
            if widths is not None and int(key) not in widths:
                continue
            if bool(self.has_zero_point):
                step, zero = F.mse_optimal_asymmetric(x, int(key))
                self.zero_points[key].fill_(float(zero))
            else:
                step = F.mse_optimal_step(x, int(key), self.is_signed, self.per_channel, qmax=self.grid(int(key))[1])
            param.copy_(step.log().to(param.device).reshape(param.shape))

    def extra_repr(self) -> str:
        grain = "per-channel" if self.per_channel else "per-tensor"
        zero = ", zero point" if bool(self.has_zero_point) else ""
        return f"{self.kind}, bits={self.bits}, allowed={self.allowed}, {grain}, signed={self.is_signed}{zero}"
