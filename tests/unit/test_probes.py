"""The finish's probes: one fixed seeded set, exact first-order predictions, re-calibration, fp32 gate passes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cgmq_cli import probes, qmodel
from cgmq_cli.cost import Budget
from cgmq_cli.quant import functional as F
from cgmq_cli.trainer import TrainConfig, Trainer


def _setup(loss_fn=None, **config):
    torch.manual_seed(0)
    x, y = torch.randn(96, 12), torch.randint(0, 3, (96,))
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    qm = qmodel.prepare(model, (12,), input_bits=8)
    qm.calibrate(x)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    cfg = TrainConfig(**{"epochs": 2, "gate_steps": 4, "probe_batches": 3, **config})
    trainer = Trainer(qm, loader, loader, Budget(rel_bops=3.0), cfg, loss_fn=loss_fn, seed=5)
    return qm, trainer, loader


def test_probe_set_is_fixed_and_seeded() -> None:
    _, trainer, loader = _setup()
    a, b = trainer.probe_set(1), trainer.probe_set(1)
    assert len(a) == 3 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    other = trainer.probe_set(3)
    assert not torch.equal(torch.cat([p[0] for p in a]), torch.cat([p[0] for p in other]))
    # under torchrun, the ranks split one sample between them
    whole = probes.probe_set(loader, 4, 5, 1)
    halves = [probes.probe_set(loader, 2, 5, 1, world=2, rank=r) for r in (0, 1)]
    rows = lambda batches: {tuple(r.tolist()) for b in batches for r in b[0]}  # noqa: E731
    assert rows(halves[0]) | rows(halves[1]) == rows(whole) and not rows(halves[0]) & rows(halves[1])


def test_table_probe_is_the_second_order_change_of_each_width() -> None:
    qm, trainer, _ = _setup()
    qm.set_bits({"0": (8, 8), "2": (4, 4)})
    batches = trainer.probe_set(0)
    pred, used = trainer.predict(batches)
    assert used == 3
    # oracle for the hidden activation (input of layer 2), by hand:
    # <dL/dQ, e> + B/2 * sum((dL/dQ * e)^2) with e = Q_w(h) - Q_4(h), averaged over the batches
    qs = qm.tensor_quantizers()
    q = qs["a__1"]
    layer0, layer2 = qm.gm.get_submodule("0"), qm.gm.get_submodule("2")
    w0 = qs["w_0"].quantize(layer0.weight.detach(), 8)
    w2 = qs["w_2"].quantize(layer2.weight.detach(), 4)
    expected = {w: 0.0 for w in q.allowed}
    for x, y in batches:
        with torch.no_grad():
            h = torch.relu(nn.functional.linear(qs["a_input_1"].quantize(x, 8), w0, layer0.bias))
        hq = q.quantize(h, 4).detach().requires_grad_(True)
        loss = nn.functional.cross_entropy(nn.functional.linear(hq, w2, layer2.bias.detach()), y)
        (g,) = torch.autograd.grad(loss, hq)
        for w in q.allowed:
            e = (q.quantize(h, w) - q.quantize(h, 4)).detach()
            expected[w] += (float((g * e).sum()) + 0.5 * len(y) * float(((g * e) ** 2).sum())) / len(batches)
    for w in q.allowed:
        assert pred["a__1"][w] == pytest.approx(expected[w], rel=1e-4, abs=1e-7)
    assert pred["a__1"][4] == 0.0 and pred["a__1"][2] > 0  # 2 bits is predicted to cost loss


def test_predictions_average_over_the_batches_really_used() -> None:
    calls = {"n": 0}

    def second_is_nan(out, y):
        calls["n"] += 1
        return nn.functional.cross_entropy(out, y) * (math.nan if calls["n"] == 2 else 1.0)

    qm, trainer, _ = _setup(loss_fn=second_is_nan)
    qm.set_bits({"0": (8, 8), "2": (4, 4)})
    batches = trainer.probe_set(0)
    pred, used = trainer.predict(batches)
    assert used == 2
    trainer.loss_fn = nn.functional.cross_entropy
    clean, n = trainer.predict([batches[0], batches[2]])
    assert n == 2
    for key in clean:
        for w in clean[key]:
            assert pred[key][w] == pytest.approx(clean[key][w], rel=1e-6, abs=1e-9)


def test_finish_probes_one_set_for_every_move() -> None:
    _, trainer, _ = _setup(finish_table="predicted")
    seen = []
    real = trainer.predict

    def spy(batches, tensors=None):
        seen.append(batches)
        return real(batches, tensors)

    trainer.predict = spy
    info = trainer.gate_epoch(0)
    assert 1 <= len(seen) <= 2 and all(s is seen[0] for s in seen)  # the plan, and at most one confirmation
    assert info["probe_batches_used"] == 3 and info["finish_seconds"] >= 0


def test_measured_table_is_the_probe_loss_of_each_single_move() -> None:
    qm, trainer, _ = _setup()
    qm.set_bits({"0": (8, 8), "2": (4, 4)})
    widths = qm.widths()
    batches = trainer.probe_set(0)
    table, used = trainer.measure(batches, widths)
    assert used == 3 and qm.widths() == widths  # left where it was
    base = trainer.probe_loss(batches, widths)
    for t in trainer.tensors:
        for w in t.quantizer.allowed:
            expected = 0.0 if w == widths[t.key] else trainer.probe_loss(batches, {**widths, t.key: w}) - base
            assert table[t.key][w] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    some = trainer.tensors[:1]
    assert set(trainer.measure(batches, widths, some)[0]) == {some[0].key}


def test_finish_uses_the_table_the_config_asks_for_on_one_probe_set() -> None:
    seen = {"measure": [], "predict": []}
    for table in ("measured", "predicted"):
        qm, trainer, _ = _setup(finish_table=table)
        for name in seen:
            real = getattr(trainer, name)
            setattr(trainer, name, lambda batches, *a, real=real, name=name: (seen[name].append(batches), real(batches, *a))[1])
        info = trainer.gate_epoch(0)
        assert info["finish_table"] == table and info["load_after_finish"] <= 1.0
        assert info["probe_batches_used"] == 3
        if table == "measured":
            assert seen["measure"] and not seen["predict"] and all(b is seen["measure"][0] for b in seen["measure"])
        else:
            assert seen["predict"]
        seen = {k: [] for k in seen}


def test_auto_measures_where_the_table_costs_at_most_five_percent_of_training_or_little_in_all() -> None:
    from cgmq_cli.schedule import MEASURE_FLOOR_MACS

    cfg = TrainConfig()  # one gate epoch in 6
    assert cfg.finish_table == "auto"
    # LeNet-5 on Fashion-MNIST: 7 tensors x 4 other widths, 8 probe batches; 469 batches of 128 per epoch
    assert cfg.measuring_fits(28, 8, 469)
    # resnet18 at 112 x 112 (38 tensors, int8-cpu: one other width each) on 1,024 images in batches of 32:
    # a gate epoch of 300 steps and five 32-batch epochs; a measured table would be 16 % of the run
    r18_batch = 32 * 1_814_073_344 / 4
    assert not cfg.measuring_fits(38, 8, 32) and not cfg.measuring_fits(38, 8, 32, r18_batch)
    # digits' small CNN (337,536 MACs an example): 20 % of its short run, but 4.8e9 MACs in all
    assert not cfg.measuring_fits(28, 8, 23) and cfg.measuring_fits(28, 8, 23, 64 * 337_536)
    assert cfg.measuring_fits(28, 8, 23, MEASURE_FLOOR_MACS / (28 * 8))
    assert not cfg.measuring_fits(28, 8, 23, MEASURE_FLOOR_MACS / (28 * 8) * 1.01)
    # the bound: 5 % of three forward passes per training step, one table per gate epoch
    steps = 6 * 400  # 400 batches per epoch: the gate epoch is one pass too
    assert cfg.measuring_fits(int(0.05 * 3 * steps / 8), 8, 400)
    assert not cfg.measuring_fits(int(0.05 * 3 * steps / 8) + 1, 8, 400)
    two = TrainConfig(epochs=6, epochs_per_round=3)  # two gate epochs: two tables
    assert two.measuring_fits(int(0.05 * 3 * steps / 16), 8, 400)
    assert not two.measuring_fits(int(0.05 * 3 * steps / 16) + 1, 8, 400)


def test_finish_recalibrates_switched_widths_and_resets_their_adam_state() -> None:
    qm, trainer, _ = _setup(recalibrate=True)
    trainer.weight_epoch(1)  # every tensor trained at 32 bits: widths {32}; Adam state for the weights
    wq = qm.tensor_quantizers()["w_0"]
    weight = qm.gm.get_submodule("0").weight
    with torch.no_grad():
        weight.mul_(3.0)  # the weights moved since calibration: the old 8-bit step is stale
    qm.set_bits({"0": (8, 8), "2": (8, 8)})
    step8 = wq.steps["8"]
    trainer.optimizer.state[step8] = {"step": torch.tensor(3.0), "exp_avg": torch.ones(()), "exp_avg_sq": torch.ones(())}
    trainer.state.trained_widths = {k: 32 for k in qm.widths()}
    trainer._recalibrate(trainer.probe_set(0))
    assert step8 not in trainer.optimizer.state
    fresh = F.mse_optimal_step(weight.detach(), 8, True, True, qmax=wq.grid(8)[1]).log()
    assert torch.allclose(wq.steps["8"].detach(), fresh.reshape(wq.steps["8"].shape))


def test_gate_and_probe_passes_never_autocast() -> None:
    _, trainer, _ = _setup()
    trainer.amp = True  # as with --amp on CUDA; the flag alone decides what each pass asks for
    asked = []
    trainer._forward_loss = lambda model, x, y, amp, training=False: (asked.append(amp), nn.functional.cross_entropy(model(x), y))[1]
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=False)
    trainer.gate_epoch(0)
    assert asked and not any(asked)
    asked.clear()
    trainer.weight_epoch(1)
    assert asked and all(asked)


def test_weight_training_minimises_the_training_loss_and_everything_else_the_task_loss() -> None:
    calls = {"task": 0, "train": 0}

    def counted(name):
        def fn(out, y):
            calls[name] += 1
            return nn.functional.cross_entropy(out, y)
        return fn

    _, trainer, loader = _setup(loss_fn=counted("task"))
    trainer.train_loss_fn = counted("train")
    trainer.gate_epoch(0)  # gate steps, probes and the finish's table
    assert calls["task"] > 0 and calls["train"] == 0
    calls["task"] = 0
    trainer.weight_epoch(1)
    assert calls["train"] == len(loader) and calls["task"] == 0


def test_label_smoothing_is_the_built_in_cross_entropy_with_smoothed_targets() -> None:
    from cgmq_cli.losses import task_loss, training_loss

    torch.manual_seed(0)
    out, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    task = task_loss(None)
    smoothed = training_loss(None, 0.2, task)
    assert float(smoothed(out, y)) == pytest.approx(float(nn.functional.cross_entropy(out, y, label_smoothing=0.2)))
    assert float(smoothed(out, y)) != pytest.approx(float(task(out, y)))
    assert training_loss(None, 0.0, task) is task
    own = task_loss("torch.nn.functional:cross_entropy")
    assert training_loss("torch.nn.functional:cross_entropy", 0.2, own) is own


def test_kl_to_teacher() -> None:
    from cgmq_cli.errors import TrainingError
    from cgmq_cli.trainer import kl_to_teacher

    torch.manual_seed(0)
    a, b = torch.randn(4, 10), torch.randn(4, 10)
    assert float(kl_to_teacher(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_to_teacher(a + 3.0, a)) == pytest.approx(0.0, abs=1e-6)  # a shift of the logits is the same output
    expected = torch.nn.functional.kl_div(torch.log_softmax(a, 1), torch.log_softmax(b, 1), log_target=True,
                                          reduction="batchmean")
    assert float(kl_to_teacher(a, b)) == pytest.approx(float(expected), rel=1e-5)
    # dense outputs: the class dimension is 1, every other position is averaged
    dense_a, dense_b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    flat = kl_to_teacher(dense_a.permute(0, 2, 3, 1).reshape(-1, 3), dense_b.permute(0, 2, 3, 1).reshape(-1, 3))
    assert float(kl_to_teacher(dense_a, dense_b)) == pytest.approx(float(flat), rel=1e-5)
    with pytest.raises(TrainingError, match="same shape"):
        kl_to_teacher(a, torch.randn(4, 9))
