"""`cgmq export --float` writes the user's float model as given: original weights, BatchNorm as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cli_helpers import NO_INT8, cli, one_line_error
from cgmq_cli.errors import EXIT_BAD_INPUT

NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))
'''


def test_float_is_the_model_as_given(tmp_path: Path) -> None:
    import onnxruntime as ort

    (tmp_path / "net.py").write_text(NET)
    namespace: dict = {}
    exec(compile(NET, "net.py", "exec"), namespace)  # the same class, to make the user's weights
    torch.manual_seed(1)
    model = namespace["Net"]().eval()
    with torch.no_grad():  # BN statistics far from the identity
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    ckpt = tmp_path / "net.pt"
    torch.save(model.state_dict(), ckpt)
    run = tmp_path / "runs" / "bn"
    made = cli("compress", ckpt, "--arch", f"{tmp_path / 'net.py'}:Net", "--data", "digits", "--epochs", "2",
               "--subset", "256", "--gate-steps", "5", *NO_INT8, "--budget-rel-bops", "20", "--out", run)
    assert made.exit_code == 0, made.output
    exported = cli("export", run, "--float", run / "float.onnx")
    assert exported.exit_code == 0, exported.output
    assert f"wrote {run / 'float.onnx'} (your float model as given" in exported.stdout
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(run / "float.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() < 1e-4  # the user's weights, not the retrained ones

    ckpt.write_bytes(ckpt.read_bytes() + b"\0")  # the model file changed since the run
    one_line_error(cli("export", run, "--float", run / "float2.onnx", "--force"), EXIT_BAD_INPUT,
                   "which is missing or changed since", "drop --float")
    assert not (run / "float2.onnx").exists()
