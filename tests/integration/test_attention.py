"""Attention and embeddings are quantized and counted: nn.MultiheadAttention, F.scaled_dot_product_attention,
a torch.fx.wrap-ped attention function, embeddings; each compresses within budget and exports with parity.

The models are trained in float for a few hundred steps on a synthetic task first, so that their
logits have margins (a random-init transformer's near-tied logits flip under any rounding difference).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cgmq_cli import qmodel
from cgmq_cli.cost import Budget
from cgmq_cli.export import onnx_qdq, verify
from cgmq_cli.trainer import Trainer, TrainConfig

TOKENS, DIM = 6, 16


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.att = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, 3)

    def forward(self, x):
        h = self.inp(x)
        h = self.norm(h + self.att(h, h, h, need_weights=False)[0])
        return self.head(h.mean(1))


class SDPA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.head(self.proj(F.scaled_dot_product_attention(q, k, v)).mean(1))


def wrapped_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads: int):
    batch, n, c = x.shape
    qkv = F.linear(x, qkv_w, qkv_b).reshape(batch, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    probs = torch.softmax(q @ k.transpose(-2, -1) * (c // heads) ** -0.5, dim=-1)
    return F.linear((probs @ v).transpose(1, 2).reshape(batch, n, c), proj_w, proj_b)


torch.fx.wrap("wrapped_attention")


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 3)

    def forward(self, x):
        out = wrapped_attention(x, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias, 2)
        return self.head(out.mean(1))


def _data(n: int = 1024) -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, TOKENS, DIM, generator=gen)
    y = (x.mean(1) @ torch.randn(DIM, 3, generator=gen)).argmax(1)
    train = TensorDataset(x[: n - 256], y[: n - 256])
    val = TensorDataset(x[n - 256:], y[n - 256:])
    return DataLoader(train, batch_size=64, shuffle=True, generator=gen), DataLoader(val, batch_size=128)


def _trained(model: nn.Module, loader: DataLoader) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(8):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.mark.parametrize("cls", [MHA, SDPA, Wrapped])
def test_attention_compresses_within_budget_and_exports_with_parity(cls, tmp_path: Path) -> None:
    train, val = _data()
    qm = qmodel.prepare(_trained(cls(), train), (TOKENS, DIM))
    products = [layer for layer in qm.layers if layer.op == "matmul"]
    assert len(products) == 2  # q @ k^T and p @ v
    for layer in products:  # both operands are activations with their own quantizer and gate
        assert layer.weight_key is None and len(set(layer.act_keys)) == 2
        assert all(len(qm.tensor_quantizers()[k].allowed) > 1 for k in layer.act_keys)
    assert qm.cost().coverage == 100.0 and not qm.float_ops
    qm.calibrate(next(iter(train))[0])
    budget = Budget(rel_bops=3.0)
    Trainer(qm, train, val, budget, TrainConfig(epochs=2, gate_steps=40)).run()
    cost = qm.cost()
    assert budget.is_satisfied_by(cost)
    for layer, row in zip(qm.layers, cost.layers):  # a product's BOPs: MACs x b_left x b_right
        if layer.op == "matmul":
            widths = qm.widths()
            assert row.bops == layer.macs * widths[layer.act_keys[0]] * widths[layer.act_keys[1]]
    info = onnx_qdq.export_qdq(qm, tmp_path / "m.onnx", parity_inputs=[x for x, _ in val])
    assert info.parity.agreement >= 99.9
    result = verify.read_widths(info.path)
    rows = {r.node: r for r in result.layers}
    assert sum(rows[layer.name].bops for layer in qm.layers) == cost.bops  # read back exactly
    for layer in products:
        assert rows[layer.name].op == "MatMul" and rows[layer.name].weight_bytes == 0


class Tokens(nn.Module):
    """An embedding, a learned position table, LayerNorm and a head: weight bytes by hand below."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.pos = nn.Parameter(torch.zeros(1, 5, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids) + self.pos).mean(1))


def test_weight_bytes_count_embeddings_and_float_parameters_by_hand() -> None:
    qm = qmodel.prepare(Tokens(), (5,), input_dtype=torch.int64)
    assert [(layer.name, layer.op) for layer in qm.layers] == [("embed", "embedding"), ("head", "linear")]
    embed = qm.layers[0]
    assert embed.macs == 0 and embed.act_keys == () and qm.tensor_quantizers()[embed.weight_key].per_channel
    qm.set_bits({"embed": (4, 32), "head": (8, 8)})
    cost = qm.cost()
    # embedding 50 x 8 at 4 bits; head 8 x 4 at 8 bits + 4 float biases; pos 5 x 8 and LayerNorm 2 x 8 at 32 bits
    assert cost.weight_bytes == 50 * 8 * 4 / 8 + 8 * 4 * 8 / 8 + 4 * 4 + (5 * 8 + 2 * 8) * 4
    assert cost.float_params == 5 * 8 + 2 * 8
    assert cost.bops == 8 * 4 * 8 * 8  # the lookup has no MACs


def test_compute_left_in_float_is_named_and_counted() -> None:
    class Leafy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c3 = nn.Conv3d(1, 2, 3)
            self.fc = nn.Linear(2 * 2 * 2 * 2, 3)

        def forward(self, x):
            return self.fc(self.c3(x).flatten(1))

    qm = qmodel.prepare(Leafy(), (1, 4, 4, 4))
    assert [layer.name for layer in qm.layers] == ["fc"]
    (op,) = qm.float_ops
    assert op.what == "c3" and "Conv3d" in op.reason and op.macs == 2 * 8 * 27
    cost = qm.cost()
    assert cost.macs == 2 * 8 * 27 + 16 * 3 and cost.coverage == pytest.approx(100 * 48 / cost.macs)
    qm.set_bits({"fc": (2, 2)})  # the float conv still costs 32 x 32 per MAC
    assert qm.cost().bops == 2 * 8 * 27 * 1024 + 48 * 4
    assert qm.cost().bops_fp32 == cost.macs * 1024
