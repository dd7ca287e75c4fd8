"""Quantizer math (cgmq_cli.quant.functional) and the gated quantizer (cgmq_cli.quant.modules).

Every forward value is checked against a small independent reference written
here (exact equality), every gradient against the hand-derived STE / LSQ
formulas, and the gate gradient against the loss change it is meant to predict.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cgmq_cli import qmodel
from cgmq_cli.quant import functional as F
from cgmq_cli.quant.modules import GatedQuantizer

WIDTHS = (2, 4, 8, 16)


# ------------------------------------------------------------ reference ---


def ref_fake_quant(x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int):
    """Forward value, d out/d x and d out/d s (before the LSQ factor), per element."""
    v = x / s
    q = torch.clamp(torch.round(v), qmin, qmax)  # torch.round: half to even
    inside = (v >= qmin) & (v <= qmax)
    return q * s, inside.to(x.dtype), torch.where(inside, torch.round(v) - v, q)


def onnx_range(bits: int, signed: bool) -> tuple[int, int]:
    """The ONNX integer types of each width, written out (not computed)."""
    table = {
        (2, True): (-2, 1), (2, False): (0, 3),
        (4, True): (-8, 7), (4, False): (0, 15),
        (8, True): (-128, 127), (8, False): (0, 255),
        (16, True): (-32768, 32767), (16, False): (0, 65535),
    }
    return table[(bits, signed)]


def _data(shape, seed=0, scale=1.0, nonneg=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * scale
    return x.abs() if nonneg else x


def _set_step(q: GatedQuantizer, bits: int, step: torch.Tensor) -> None:
    with torch.no_grad():
        q.steps[str(bits)].copy_(step.log().reshape(q.steps[str(bits)].shape))


# ------------------------------------------------- forward and STE / LSQ ---


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_functional_fake_quant_matches_reference(bits: int, signed: bool, per_channel: bool) -> None:
    qmin, qmax = F.qrange(bits, signed)
    x = _data((6, 5, 7), seed=bits, scale=2.0, nonneg=False)
    # A range that clips part of the tensor at both ends (and the negative half when unsigned).
    top = x.abs().reshape(6, -1).amax(1) if per_channel else x.abs().max()
    s = (0.6 * top / qmax).detach()
    s_view = F.channel_view(s, x.ndim)
    x = x.clone().requires_grad_(True)
    s_leaf = s_view.clone().requires_grad_(True)
    out = F.fake_quant(x, s_leaf, qmin, qmax)
    want, dx, ds = ref_fake_quant(x.detach(), s_view, qmin, qmax)
    assert torch.equal(out.detach(), want)  # atol = 0
    upstream = _data(x.shape, seed=99)
    gx, gs = torch.autograd.grad((out * upstream).sum(), (x, s_leaf))
    torch.testing.assert_close(gx, upstream * dx, rtol=1e-6, atol=1e-7)  # s * (1/s): one rounding
    want_gs = (upstream * ds).sum(dim=(1, 2), keepdim=True) if per_channel else (upstream * ds).sum()
    torch.testing.assert_close(gs.reshape(want_gs.shape), want_gs, rtol=1e-5, atol=1e-5)
    # both clip regions and the inside are exercised
    assert (dx == 0).any() and (dx == 1).any()


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("case", ["weight-per-channel", "weight-per-tensor", "act-signed", "act-unsigned"])
def test_gated_quantizer_forward_and_lsq_gradient(bits: int, case: str) -> None:
    kind, grain = case.split("-", 1)
    shape = (4, 3, 5, 5)
    if kind == "weight":
        q = GatedQuantizer("weight", (bits, 32), channels=4 if grain == "per-channel" else None)
    else:
        q = GatedQuantizer("act", (bits, 32), None, signedness=grain)
    q.set_bits(bits)
    x = _data(shape, seed=bits, nonneg=(grain == "unsigned"))
    signed = kind == "weight" or grain == "signed"
    assert q.is_signed == signed
    qmin, qmax = F.qrange(bits, signed)
    per_channel = grain == "per-channel"
    top = x.abs().reshape(4, -1).amax(1) if per_channel else x.abs().max()
    _set_step(q, bits, 0.7 * top / qmax)
    s = q.steps[str(bits)].detach().exp()
    s_view = F.channel_view(s, x.ndim)

    x = x.clone().requires_grad_(True)
    out = q(x)
    want, dx, ds = ref_fake_quant(x.detach(), s_view, qmin, qmax)
    assert torch.equal(out.detach(), want)  # atol = 0: exactly s * q with s = exp(log s)

    upstream = _data(shape, seed=7)
    (out * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream * dx, rtol=1e-6, atol=1e-7)
    # LSQ: d out/d s scaled by 1/sqrt(N * qmax), N = elements sharing one step; the parameter is log s.
    n_per_step = x.numel() // s.numel()
    factor = 1.0 / math.sqrt(n_per_step * qmax)
    per_elem = upstream * ds * factor * s_view
    want_g = per_elem.reshape(4, -1).sum(1) if per_channel else per_elem.sum()
    torch.testing.assert_close(q.steps[str(bits)].grad, want_g, rtol=1e-4, atol=1e-7)
    assert (dx == 0).any() and (dx == 1).any()


def test_gated_forward_uses_exactly_the_stored_step() -> None:
    """The LSQ gradient scaling must not perturb the step in the forward pass (not even
    by one ulp): the exported scale is exp(log s) and must reproduce training exactly."""
    q = GatedQuantizer("weight", (4, 32), channels=64)
    q.set_bits(4)
    x = _data((64, 3, 3, 3), seed=11)
    gen = torch.Generator().manual_seed(12)
    for _ in range(20):
        with torch.no_grad():
            q.steps["4"].copy_(torch.rand(64, generator=gen) * 6 - 7)
        s = F.channel_view(q.steps["4"].detach().exp(), x.ndim)
        assert torch.equal(q(x).detach(), ref_fake_quant(x, s, -8, 7)[0])


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("signed", [True, False])
def test_grid_values_unchanged_and_clipping(bits: int, signed: bool) -> None:
    qmin, qmax = F.qrange(bits, signed)
    s = torch.tensor(0.125)  # exact in binary: s * k is exact
    codes = torch.arange(qmin, qmax + 1, dtype=torch.float32) if bits <= 8 else \
        torch.tensor([qmin, qmin + 1, -1, 0, 1, 2, 1000, qmax - 1, qmax], dtype=torch.float32).clamp(qmin, qmax)
    on_grid = codes * s
    assert torch.equal(F.fake_quant(on_grid, s, qmin, qmax), on_grid)
    far = torch.tensor([-1e6, -1e3 * qmax, 1e3 * qmax, 1e6], requires_grad=True)
    out = F.fake_quant(far, s, qmin, qmax)
    assert out.tolist() == [qmin * 0.125, qmin * 0.125, qmax * 0.125, qmax * 0.125]
    out.sum().backward()
    assert far.grad.tolist() == [0.0, 0.0, 0.0, 0.0]
    inside = (torch.linspace(qmin + 0.3, qmax - 0.3, 11) * s).requires_grad_(True)
    F.fake_quant(inside, s, qmin, qmax).sum().backward()
    assert inside.grad.tolist() == [1.0] * 11  # s = 1/8: s * (1/s) is exact


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("signed", [True, False])
def test_codes_fit_the_onnx_type(bits: int, signed: bool) -> None:
    lo, hi = onnx_range(bits, signed)
    assert F.qrange(bits, signed) == (lo, hi)
    x = torch.cat([_data(5000, seed=bits, scale=3.0), torch.tensor([-1e9, 1e9, 0.0])])
    s = torch.tensor(1.0 / max(hi, 1))  # most of the data clips at both ends
    codes = F.quantize_codes(x, s, lo, hi)
    assert codes.dtype == torch.int64
    assert int(codes.min()) == lo and int(codes.max()) == hi
    assert ((codes >= lo) & (codes <= hi)).all()
    assert int(F.quantize_codes(torch.tensor(0.0), s, lo, hi)) == 0  # zero is representable
    # the fake-quantized value is exactly step * code
    assert torch.equal(F.fake_quant(x, s, lo, hi), codes.to(torch.float32) * s)


def test_round_half_to_even() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49, 0.51])
    want = [0.0, 2.0, 2.0, 4.0, 0.0, -2.0, -2.0, 0.0, 1.0]
    assert F.fake_quant(x, torch.tensor(1.0), -8, 7).tolist() == want
    assert F.quantize_codes(x, torch.tensor(1.0), -8, 7).tolist() == [int(v) for v in want]
    # with a non-unit step: 2.5 * 0.25 -> code 2
    assert F.quantize_codes(torch.tensor([0.625, 0.375]), torch.tensor(0.25), 0, 15).tolist() == [2, 2]


def test_width_32_is_pass_through() -> None:
    for q in (GatedQuantizer("weight", (2, 8, 32), channels=3), GatedQuantizer("act", (4, 32))):
        q.set_bits(32)
        assert q.bits == 32
        x = _data((3, 4, 5), scale=100.0).requires_grad_(True)
        out = q(x)
        assert torch.equal(out, x)
        out.sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))
    assert "32" not in GatedQuantizer("act", (4, 32)).steps  # no step for float


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("per_channel", [False, True])
def test_mse_initialisation_beats_max_on_heavy_tails(bits: int, per_channel: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    u = torch.rand(16, 2000, generator=gen) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace(0, 1), fixed seed
    qmin, qmax = F.qrange(bits, True)

    def mse(step):
        return (F.fake_quant(x, F.channel_view(step, x.ndim), qmin, qmax) - x).pow(2).mean().item()

    e_mse = mse(F.mse_optimal_step(x, bits, True, per_channel))
    e_max = mse(F.max_step(x, bits, True, per_channel))
    assert e_mse < 0.7 * e_max, (e_mse, e_max)


# ------------------------------------------------------------------- gate ---


def test_gate_maps_log2_scale_to_widths() -> None:
    q = GatedQuantizer("weight", (2, 4, 8, 16, 32))
    assert q.bits == 32  # starts at the widest
    for g, bits in ((1.0, 2), (2.0, 4), (3.0, 8), (4.0, 16), (5.0, 32), (1.49, 2), (1.51, 4), (4.6, 32), (0.0, 2), (7.0, 32)):
        with torch.no_grad():
            q.gate.fill_(g)
        assert q.bits == bits, g
    for bits in (2, 4, 8, 16, 32):
        q.set_bits(bits)
        assert q.bits == bits and float(q.gate) == math.log2(bits)


def test_gate_nearest_width_in_non_contiguous_set() -> None:
    q = GatedQuantizer("act", (2, 8))
    for g, bits in ((1.0, 2), (1.9, 2), (2.1, 8), (3.0, 8), (5.0, 8), (-1.0, 2)):
        with torch.no_grad():
            q.gate.fill_(g)
        assert q.bits == bits, g
    q.set_bits(2)
    assert q.neighbour(+1) == 8 and q.neighbour(-1) is None
    with pytest.raises(ValueError, match="not in allowed set"):
        q.set_bits(4)
    with pytest.raises(ValueError):
        q.set_bits(32)
    assert q.bits == 2  # a refused width leaves the gate alone


def test_clamp_gate() -> None:
    q = GatedQuantizer("weight", (4, 8, 16))
    for g, want in ((7.0, 4.0), (0.5, 2.0), (3.3, 3.3)):
        with torch.no_grad():
            q.gate.fill_(g)
        q.clamp_gate()
        assert float(q.gate) == pytest.approx(want)


def test_set_bits_on_prepared_model_refuses_outside_allowed() -> None:
    qm = qmodel.prepare(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), (4,),
                        widths_for=lambda *a: ((2, 8), (4, 8)))
    qm.set_bits({"0": (2, 8), "2": (8, 4)})
    assert qm.bits() == {"0": (2, 8), "2": (8, 4)}
    with pytest.raises(ValueError):
        qm.set_bits({"0": (4, 8), "2": (8, 4)})


# ------------------------------------------------------------- probe mode ---


def _probe(q: GatedQuantizer, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    q.probing = True
    q.gate.requires_grad_(True)
    q.down_probe.requires_grad_(True)
    q.gate.grad = q.down_probe.grad = None
    out = q(x)
    (out * upstream).sum().backward()
    return out


@pytest.mark.parametrize("kind", ["weight", "act"])
def test_probe_gradients_are_residual_inner_products(kind: str) -> None:
    x = _data((6, 4, 3, 3), seed=3)
    q = GatedQuantizer(kind, (2, 4, 8, 16, 32), channels=6 if kind == "weight" else None)
    q.calibrate(x)
    upstream = _data(x.shape, seed=4)
    for bits in (2, 4, 8, 16, 32):
        q.set_bits(bits)
        q.probing = False
        with torch.no_grad():
            plain = q(x)
            q_up = q.quantize(x, {2: 4, 4: 8, 8: 16, 16: 32, 32: 32}[bits])
            q_down = q.quantize(x, {2: 2, 4: 2, 8: 4, 16: 8, 32: 16}[bits])
        out = _probe(q, x, upstream)
        assert torch.equal(out.detach(), plain)  # probing does not change the forward value
        if bits < 32:
            want_up = (upstream * (q_up - plain)).sum()
        else:  # top width: flipped residual of the width below
            want_up = (upstream * (plain - q_down)).sum()
        want_down = (upstream * (q_down - plain)).sum()  # 0 at the lowest width
        torch.testing.assert_close(q.gate.grad, want_up, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q.down_probe.grad, want_down, rtol=1e-5, atol=1e-6)
        assert q.gate.grad.item() != 0.0
        if bits == 2:
            assert q.down_probe.grad.item() == 0.0
        else:
            assert q.down_probe.grad.item() != 0.0
        q.probing = False


def test_probe_keeps_input_gradient() -> None:
    q = GatedQuantizer("act", (2, 4, 32))
    x = _data((200,), seed=5)
    q.calibrate(x)
    q.set_bits(2)
    upstream = _data(x.shape, seed=6)
    x1 = x.clone().requires_grad_(True)
    (q(x1) * upstream).sum().backward()
    x2 = x.clone().requires_grad_(True)
    _probe(q, x2, upstream)
    assert torch.equal(x1.grad, x2.grad)


def _mlp_case(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(256, 16)
    with torch.no_grad():
        target = model(x)
    qm = qmodel.prepare(copy.deepcopy(model), (16,))
    qm.calibrate(x)
    return qm, x, target


def test_gate_gradient_predicts_loss_change_of_doubling() -> None:
    """<dL/dQ, Q_4 - Q_2> vs the measured loss change of moving one tensor 2 -> 4 bits.

    Distillation MSE to the float outputs; the other tensors sit at 8 bits. The
    loss is quadratic in the perturbation, so the first-order prediction is about
    twice the measured change: same sign, within a factor 3, highly correlated.
    """
    lossf = nn.MSELoss()
    predicted, measured = [], []
    for seed in (0, 1):
        qm, x, target = _mlp_case(seed)
        pairs = qm.quantizers()
        names = list(pairs)
        tensors = [pairs[n][0] for n in names] + [pairs[n][1] for n in names[1:]]  # input act is fixed at 8 bits
        base = {n: (8, 8) for n in names}
        for q in tensors:
            qm.set_bits(base)
            q.set_bits(2)
            with torch.no_grad():
                before = lossf(qm.gm(x), target).item()
            qm.set_probing(True)
            qm.gm.zero_grad()
            lossf(qm.gm(x), target).backward()
            predicted.append(q.gate.grad.item())
            qm.set_probing(False)
            q.set_bits(4)
            with torch.no_grad():
                measured.append(lossf(qm.gm(x), target).item() - before)
    p, m = torch.tensor(predicted), torch.tensor(measured)
    assert len(p) == 10
    assert (m < 0).all()  # more bits help here
    assert (torch.sign(p) == torch.sign(m)).all(), (p, m)
    ratio = p / m
    assert ((ratio > 1 / 3) & (ratio < 3)).all(), ratio
    assert torch.corrcoef(torch.stack([p, m]))[0, 1] > 0.8


def test_set_probing_toggles_gate_grads_only_in_gate_epochs() -> None:
    qm, x, target = _mlp_case(0)
    gates = [q.gate for q in qm.all_quantizers()]
    assert not any(g.requires_grad for g in gates)
    assert not {id(g) for g in gates} & {id(p) for p in qm.weight_params()}
    qm.set_probing(True)
    assert all(g.requires_grad for g in gates)
    qm.set_probing(False)
    assert not any(g.requires_grad for g in gates)


# --------------------------------------------------------------- property ---

_PROPS = settings(max_examples=50, derandomize=True, deadline=None)


@_PROPS
@given(
    bits=st.sampled_from(WIDTHS),
    signed=st.booleans(),
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-3, 1e3),
    clip=st.floats(0.05, 2.0),
)
def test_property_output_on_grid(bits, signed, shape, seed, scale, clip) -> None:
    qmin, qmax = F.qrange(bits, signed)
    x = _data(tuple(shape), seed=seed, scale=scale).double()
    step = torch.tensor(clip * scale / qmax, dtype=torch.float64)
    out = F.fake_quant(x, step, qmin, qmax)
    k = out / step
    assert (k - k.round()).abs().max() <= 1e-5
    assert k.min() >= qmin - 1e-5 and k.max() <= qmax + 1e-5
    # float32, as trained: integral up to float32 rounding of step * code
    x32, s32 = x.float(), step.float()
    k32 = F.fake_quant(x32, s32, qmin, qmax) / s32
    assert ((k32 - k32.round()).abs() <= 1e-5 * k32.abs().clamp(min=1.0)).all()


@_PROPS
@given(
    bits=st.sampled_from(WIDTHS),
    signed=st.booleans(),
    n=st.integers(1, 64),
    seed=st.integers(0, 2**16),
    step=st.floats(1e-4, 10.0),
    halves=st.booleans(),
)
def test_property_error_at_most_half_step_inside(bits, signed, n, seed, step, halves) -> None:
    qmin, qmax = F.qrange(bits, signed)
    gen = torch.Generator().manual_seed(seed)
    k = qmin + torch.rand(n, generator=gen, dtype=torch.float64) * (qmax - qmin)
    if halves:  # exact ties between two codes
        k = (k.floor() + 0.5).clamp(max=qmax)
    s = torch.tensor(step, dtype=torch.float64)
    x = k * s
    err = (F.fake_quant(x, s, qmin, qmax) - x).abs()
    assert (err <= s / 2 * (1 + 1e-9)).all()
    # float32
    x32, s32 = x.float(), s.float()
    err32 = (F.fake_quant(x32, s32, qmin, qmax) - x32).abs()
    assert (err32 <= s32 / 2 * (1 + 1e-5) + 1e-6 * x32.abs()).all()
