"""The op registry: names agree with what profiles may say; placement of quantizers on small graphs."""

from __future__ import annotations

import torch
from torch import nn

from cgmq_cli import ops, opnames, qmodel


def test_registry_names_are_the_profile_names() -> None:
    assert set(ops.INTEGER_OPS) == set(opnames.INTEGER_OPS)
    kinds = {op.profile_kind for op in ops.COMPUTE_OPS} | {"depthwise"}  # depthwise: a conv2d with groups
    assert kinds == set(opnames.PROFILE_KINDS)
    assert {"Conv", "Gemm", "MatMul"} <= set(ops.ONNX_COMPUTE_TYPES)


class Block(nn.Module):
    """conv -> relu -> (conv1, conv2 both read it) -> add -> maxpool -> flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        y = torch.relu(self.a(x))
        z = self.b(y) + self.c(y)
        return self.fc(torch.flatten(nn.functional.max_pool2d(torch.relu(z), 2), 1))


def _acts(qm: qmodel.QuantizedModel) -> dict[str, tuple]:
    return {k: (t.layers, t.aliases, qm.tensor_quantizers()[k].allowed) for k, t in qm.tensors.items() if t.kind == "act"}


def test_one_quantizer_per_tensor_without_integer_kernels() -> None:
    qm = qmodel.prepare(Block(), (3, 8, 8))
    acts = _acts(qm)
    # the input, relu(a) read by b and c (one quantizer), flatten(...) read by fc; the add reads float
    assert list(acts) == ["a_x", "a_relu", "a_flatten"]
    assert acts["a_relu"][0] == ("b", "c")
    assert qm.layers[1].act_keys == qm.layers[2].act_keys == ("a_relu",)


def test_integer_kernels_quantize_add_inputs_and_outputs_and_alias_pooling() -> None:
    qm = qmodel.prepare(Block(), (3, 8, 8), integer_ops=opnames.INTEGER_OPS)
    acts = _acts(qm)
    assert acts["a_relu"][0] == ("b", "c")
    # both add inputs (the conv outputs) and the add's output after its ReLU: no compute op reads
    # them, so they have no gate and take the integer width
    assert acts["a_b"] == ((), (), (8,)) and acts["a_c"] == ((), (), (8,))
    out = [k for k, (layers, aliases, _) in acts.items() if "flatten" in [a.split("_")[0] for a in aliases]]
    assert len(out) == 1 and acts[out[0]][0] == ("fc",)  # fc's input moved above max-pool and flatten
    assert set(acts[out[0]][1]) == {"max_pool2d", "flatten"}
    # every reader reads the quantized tensor: the add's inputs are quantizer outputs
    add = next(n for n in qm.gm.graph.nodes if n.op == "call_function" and "add" in n.name)
    assert all(a.op == "call_module" and a.target.startswith("cgmq.a_") for a in add.args)
