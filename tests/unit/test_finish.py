"""The discrete finish: the four faults a review reproduced (regression tests), and its guarantees.

Each fault test, written against the finish as it was (commit 4b6c13f: cgmq.repair/fill with a
probe per move), failed there: 1 raised "repair found no width to lower", 2 never returned, 3
lowered the activations although only weight bytes were violated, 4 made 6 fill moves predicted
+5.0 each. Faults 1 and 2 as a user met them: tests/integration/test_compress.py.
"""

from __future__ import annotations

import signal

import torch
from torch import nn

from cgmq_cli import cgmq, finish, models, qmodel
from cgmq_cli.cost import Budget
from cgmq_cli.profiles import HardwareProfile
from two_layers import prepared

# A cost table whose entries tie: halving a 16-bit weight to 8 bits saves nothing.
TIED = HardwareProfile(name="tied", weight_bits=(4, 8, 16), act_bits=(8,), input_bits=8,
                       cost_table={(4, 8): 0.5, (8, 8): 1.0, (16, 8): 1.0})


def _tied_digits() -> qmodel.QuantizedModel:
    """DigitsCNN under TIED: MACs 337,536, so the minimum cost (all 4x8) is 168,768 and all 16x8 is 337,536."""
    torch.manual_seed(0)
    qm = qmodel.prepare(models.DigitsCNN(), (1, 8, 8), widths_for=TIED.widths_for, input_bits=8)
    qm.calibrate(torch.randn(16, 1, 8, 8))
    return qm


def _flat(tensors, down: float, up: float, widths) -> dict:
    """Predictions: every lower width costs ``down`` per step, every higher one ``up`` per step."""
    out = {}
    for t in tensors:
        allowed = t.quantizer.allowed
        here = allowed.index(widths[t.key])
        out[t.key] = {w: (down if i < here else up) * abs(i - here) for i, w in enumerate(allowed)}
    return out


def _within(seconds: float, fn):
    """Run ``fn``; a TimeoutError if it has not returned after ``seconds`` (a hang fails the test)."""
    def expire(*_):
        raise TimeoutError(f"did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- the four faults ---------------------------------------------------------------------------------

def test_fault1_repair_looks_past_tied_table_entries() -> None:
    qm = _tied_digits()
    tensors = cgmq.free_tensors(qm)
    costs = cgmq.CostModel(qm.shapes, Budget(cost=300000), TIED.mac_cost)
    widths = qm.widths()
    assert costs.summary(widths).cost == 337536 and costs.violated(widths)
    bits, moves = finish.repair(tensors, costs, widths, _flat(tensors, 1.0, -1.0, widths))
    assert not costs.violated(bits) and moves
    assert all(m.new == 4 and m.old == 16 for m in moves)  # 16 -> 8 saves nothing: repair goes on to 4


def test_fault2_constraint_finish_ends_on_tied_table_entries() -> None:
    """The cost slope at a tie was 0 and the stuck check needed every tensor at its minimum: it never
    returned. Now the slope looks past the tie (16 -> 8 saves nothing, 8 -> 4 does) and the loop is bounded."""
    qm = _tied_digits()
    tensors = cgmq.free_tensors(qm)
    costs = cgmq.CostModel(qm.shapes, Budget(cost=300000), TIED.mac_cost)
    grad = costs.gradient("cost", tensors, qm.widths())
    assert float(grad.min()) > 0  # every free gate (the weights at 16 bits) is pushed down
    widths, note = _within(10, lambda: finish.constraint_repair(tensors, costs, qm.widths, eta=0.05))
    assert note is None and not costs.violated(widths)


def test_constraint_finish_hands_over_to_repair_when_no_slope_is_left() -> None:
    """A table that rewards only 4x4: no single width changes a cost, every slope is 0. The constraint
    finish stops at once with a note; repair (which may lower a width that saves nothing alone) ends it."""
    qm, profile = _joint_only()
    tensors = cgmq.free_tensors(qm)
    costs = cgmq.CostModel(qm.shapes, Budget(cost=50), profile.mac_cost)
    widths, note = _within(10, lambda: finish.constraint_repair(tensors, costs, qm.widths, eta=0.05))
    assert costs.violated(widths) and "finished with repair" in note
    bits, moves = finish.repair(tensors, costs, widths, _flat(tensors, 1.0, -1.0, widths))
    assert not costs.violated(bits) and any(m.note for m in moves)


def _joint_only():
    profile = HardwareProfile(name="joint", weight_bits=(4, 8), act_bits=(4, 8), input_bits=8,
                              cost_table={(4, 4): 0.5, (4, 8): 1.0, (8, 4): 1.0, (8, 8): 1.0})
    torch.manual_seed(0)
    qm = qmodel.prepare(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)), (6,),
                        widths_for=profile.widths_for, input_bits=8)
    qm.calibrate(torch.randn(16, 6))
    return qm, profile  # MACs 36 + 18: 8x8 everywhere costs 54, the minimum (4x4 at the second layer) 45


def test_fault3_repair_counts_savings_in_violated_budgets_only() -> None:
    qm = prepared()  # all 32 bits: relative BOPs 100 % is met, 64 KiB of weights is not
    tensors = cgmq.free_tensors(qm)
    costs = cgmq.CostModel(qm.shapes, Budget(rel_bops=100.0, weight_bytes=30000), None)
    widths = qm.widths()
    assert list(costs.violated(widths)) == ["weight_bytes"]
    pred = _flat(tensors, 1.0, -1.0, widths)
    for t in tensors:  # lowering an activation is predicted free: the old repair took those first
        if t.quantizer.kind == "act":
            pred[t.key] = {w: 0.0 for w in t.quantizer.allowed}
    bits, moves = finish.repair(tensors, costs, widths, pred)
    assert not costs.violated(bits) and moves
    assert {m.tensor for m in moves} <= {"w_big", "w_small"}
    assert all(bits[t.key] == 32 for t in tensors if t.quantizer.kind == "act")


def test_fault4_fill_makes_no_move_predicted_to_raise_the_loss() -> None:
    qm = prepared()
    qm.set_bits({"big": (4, 8), "small": (4, 4)})
    tensors = cgmq.free_tensors(qm)
    costs = cgmq.CostModel(qm.shapes, Budget(weight_bytes=20000), None)  # activations cost no bytes
    widths = qm.widths()
    bits, moves = finish.fill(tensors, costs, widths, _flat(tensors, -5.0, 5.0, widths))  # every raise: +5
    assert moves == [] and bits == widths
    # the same zero-cost raises, now predicted to help: fill makes them (and keeps the budget)
    bits, moves = finish.fill(tensors, costs, widths, _flat(tensors, 1.0, -1.0, widths))
    assert {m.tensor for m in moves} >= {"a_relu"} and not costs.violated(bits)
    assert all(m.predicted_dloss < 0 for m in moves)


# -- the guarantees ------------------------------------------------------------------------------------

def test_repair_lowers_a_width_that_saves_nothing_alone_when_only_joint_moves_save() -> None:
    qm, profile = _joint_only()
    tensors = cgmq.free_tensors(qm)
    costs = cgmq.CostModel(qm.shapes, Budget(cost=50), profile.mac_cost)
    widths = qm.widths()
    bits, moves = finish.repair(tensors, costs, widths, _flat(tensors, 1.0, -1.0, widths))
    assert not costs.violated(bits)
    assert any(m.note for m in moves)  # the unlocking move says why it was made


def test_repair_and_fill_are_bounded_by_width_steps() -> None:
    qm = prepared()
    tensors = cgmq.free_tensors(qm)
    costs = cgmq.CostModel(qm.shapes, Budget(rel_bops=2.0), None)
    widths = qm.widths()
    steps = finish.width_steps(tensors, widths, down=True)
    bits, repaired = finish.repair(tensors, costs, widths, _flat(tensors, 1.0, -1.0, widths))
    assert not costs.violated(bits) and len(repaired) <= steps
    bits2, filled = finish.fill(tensors, costs, bits, _flat(tensors, 1.0, -1.0, bits))
    assert len(filled) <= finish.width_steps(tensors, bits, down=False) and not costs.violated(bits2)
    for t in tensors:  # after fill no raise fits any more
        for w in (w for w in t.quantizer.allowed if w > bits2[t.key]):
            assert costs.violated({**bits2, t.key: w})


def test_repair_prefers_cheapest_predicted_loss_per_cost_saved() -> None:
    qm = prepared()
    qm.set_bits({"big": (8, 8), "small": (8, 8)})  # 6.25 % relative BOPs
    tensors = cgmq.free_tensors(qm)
    widths = qm.widths()
    pred = _flat(tensors, 10.0, -1.0, widths)
    pred["w_big"] = {w: 0.0 for w in pred["w_big"]}  # lowering big's weight is predicted free
    costs = cgmq.CostModel(qm.shapes, Budget(rel_bops=6.2), None)
    _, moves = finish.repair(tensors, costs, widths, pred)
    assert moves[0].tensor == "w_big" and moves[0].label == "weight of big" and moves[0].old == 8


def test_confirm_undoes_fills_that_the_second_probe_calls_harmful() -> None:
    qm = prepared()
    qm.set_bits({"big": (4, 8), "small": (4, 4)})
    tensors = cgmq.free_tensors(qm)
    before = qm.widths()
    filled = {**before, "w_small": 16, "a_relu": 8}
    pred = {t.key: {w: 0.0 for w in t.quantizer.allowed} for t in tensors}
    pred["w_small"] = {2: 1.0, 4: -0.5, 8: -0.2, 16: 0.0, 32: 0.0}  # going back to 4 is predicted to help
    widths, undone = finish.confirm(tensors, filled, before, pred)
    assert widths["w_small"] == 4 and widths["a_relu"] == 8
    assert [(m.tensor, m.old, m.new) for m in undone] == [("w_small", 16, 4)] and undone[0].note


def test_constraint_finish_reaches_a_bops_budget_without_help() -> None:
    qm = prepared()
    tensors = cgmq.free_tensors(qm)
    costs = cgmq.CostModel(qm.shapes, Budget(rel_bops=2.0), None)
    bits, note = finish.constraint_repair(tensors, costs, qm.widths, eta=0.05)
    assert note is None and not costs.violated(bits)


# -- spend: the budget the predicted fill left, on raises whose measured loss falls --------------------

def _counting(loss_of):
    """A loss_at that counts its calls."""
    calls = []

    def loss_at(widths):
        calls.append(dict(widths))
        return loss_of(widths)
    return loss_at, calls


def _narrow():
    """TwoLayers at 2-bit weights (small's input at 2 bits too) under a 2 % BOPs budget: room to raise."""
    qm = prepared()
    qm.set_bits({"big": (2, 8), "small": (2, 2)})
    tensors = cgmq.free_tensors(qm)
    return tensors, cgmq.CostModel(qm.shapes, Budget(rel_bops=2.0), None), qm.widths()


def test_spend_raises_while_the_measured_loss_falls_and_keeps_the_budget() -> None:
    tensors, costs, widths = _narrow()
    loss_of = lambda w: sum(1.0 / w[t.key] for t in tensors)  # noqa: E731  every raise helps
    loss_at, calls = _counting(loss_of)
    bits, moves = finish.spend(tensors, costs, widths, loss_at, loss_of(widths))
    assert moves and not costs.violated(bits)
    assert all(m.predicted_dloss < 0 and m.note and m.new > m.old for m in moves)
    for t in tensors:  # nothing that fits is left: the next width of every tensor breaks the budget
        up = [w for w in t.quantizer.allowed if w > bits[t.key]]
        assert not up or costs.violated({**bits, t.key: up[0]})
    assert len(calls) <= len(tensors) + (len(tensors) + 1) * len(moves)  # one per tensor, then a few per raise


def test_spend_makes_no_raise_that_does_not_lower_the_measured_loss() -> None:
    tensors, costs, widths = _narrow()
    flat = lambda w: 1.0  # noqa: E731  no raise changes the loss
    assert finish.spend(tensors, costs, widths, flat, 1.0) == (widths, [])
    worse = lambda w: sum(w.values())  # noqa: E731  every raise costs loss
    assert finish.spend(tensors, costs, widths, worse, worse(widths)) == (widths, [])


def test_spend_takes_the_largest_measured_fall_per_cost_first() -> None:
    tensors, costs, widths = _narrow()
    # only small's weight matters (a cheap layer): its raise comes first although big's would fit too
    loss_of = lambda w: 1.0 / w["w_small"] + 1e-6 / w["w_big"]  # noqa: E731
    _, moves = finish.spend(tensors, costs, widths, loss_of, loss_of(widths))
    assert moves[0].tensor == "w_small"


# -- exchange: lower one width to raise another, on the measured loss ------------------------------

def _balanced_loss(w):
    """Small's weight and input matter equally: 8x8 beats 2x32 at the same BOPs."""
    return 1.0 / w["w_small"] + 1.0 / w["a_relu"]


def test_exchange_rebalances_a_pair_that_no_raise_can_fix() -> None:
    tensors, costs, widths = _narrow()
    lopsided, _ = finish.spend(tensors, costs, widths, _balanced_loss, _balanced_loss(widths))
    assert (lopsided["w_small"], lopsided["a_relu"]) == (2, 32)  # greedy raises spent it all on one side
    assert finish.spend(tensors, costs, lopsided, _balanced_loss, _balanced_loss(lopsided))[1] == []
    bits, moves = finish.exchange(tensors, costs, lopsided, _balanced_loss, _balanced_loss(lopsided))
    assert not costs.violated(bits) and _balanced_loss(bits) < _balanced_loss(lopsided)
    assert any(m.new < m.old and m.note.startswith("exchanged") for m in moves)
    assert bits["w_small"] > 2 and bits["a_relu"] < 32


def test_exchange_makes_no_move_that_does_not_lower_the_measured_loss_and_is_bounded() -> None:
    tensors, costs, widths = _narrow()
    assert finish.exchange(tensors, costs, widths, lambda w: 1.0, 1.0) == (widths, [])
    loss_at, calls = _counting(_balanced_loss)
    bits, moves = finish.exchange(tensors, costs, widths, loss_at, _balanced_loss(widths))
    assert moves and all(m.predicted_dloss < 0 for m in moves)  # each accepted move lowered the measured loss
    ups = [m for m in moves if m.new > m.old]
    rounds = sum(len(t.quantizer.allowed) - 1 for t in tensors) + 1
    assert len(ups) <= rounds and len(calls) <= rounds * len(tensors) ** 2


def test_measured_fill_is_recorded_in_the_finish_history() -> None:
    """Through the trainer: the spent raises are fills with their measured loss change and a note.
    The probes predict no change for any move (as after weight epochs, where they are near 0): the
    predicted fill makes nothing, and what is filled is what the measured loss asked for."""
    from torch.utils.data import DataLoader, TensorDataset

    from cgmq_cli.trainer import TrainConfig, Trainer

    qm = prepared()  # every width 32: the labels are the float model's, so raises bring it closer to them
    torch.manual_seed(0)
    x = torch.randn(64, 64)
    y = qm.gm(x).argmax(1)
    qm.set_bits({"big": (2, 8), "small": (2, 2)})
    before = qm.widths()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    trainer = Trainer(qm, loader, loader, Budget(rel_bops=2.0),
                      TrainConfig(probe_batches=2, measured_fill=True, finish_table="predicted"))
    trainer.predict = lambda batches, tensors=None: ({}, len(batches))
    info = trainer.finish(0)
    assert info["load_after_finish"] <= 1.0
    measured = [m for m in info["filled"] if m["note"].startswith("measured")]
    assert measured and all(m["predicted_dloss"] < 0 for m in measured)
    assert trainer.probe_loss(trainer.probe_set(0), qm.widths()) < trainer.probe_loss(trainer.probe_set(0), before)
    off = Trainer(qm, loader, loader, Budget(rel_bops=2.0),
                  TrainConfig(probe_batches=2, measured_fill=False, finish_table="predicted"))
    off.predict = trainer.predict
    qm.set_widths(before)
    assert off.finish(0)["filled"] == [] and qm.widths() == before


# -- the schedule ----------------------------------------------------------------------------------

def test_one_gate_epoch_per_round_of_six_and_older_runs_keep_theirs() -> None:
    from cgmq_cli.settings import from_config, resolve_compress
    from cgmq_cli.trainer import TrainConfig

    assert TrainConfig(epochs=6).schedule() == ["gate"] + ["weight"] * 5
    assert TrainConfig(epochs=12).schedule() == (["gate", "weight"] * 2 + ["weight"] * 8)
    assert TrainConfig(epochs=6, epochs_per_round=3).schedule() == ["gate", "weight"] * 2 + ["weight"] * 2
    assert TrainConfig(epochs=2).schedule() == ["gate", "weight"]
    saved = resolve_compress({"model": "m.pt", "data": "digits"}, {"rel_bops": 1.0}, project_file=False).as_dict()
    assert from_config(saved, "config.json").train.schedule() == TrainConfig().schedule()
    older = {**saved, "train": {k: v for k, v in saved["train"].items() if k not in ("epochs_per_round", "measured_fill")}}
    assert from_config(older, "config.json").train.epochs_per_round == 3  # a resumed older run: two gate epochs in 6


def test_gate_share_gives_the_rest_of_the_gate_pass_to_weight_training() -> None:
    """gate_share 0.5: half a pass of gate steps, the finish, then half a pass of weight training at the
    finished widths; the learning rate's clock counts those steps."""
    from torch.utils.data import DataLoader, TensorDataset

    from cgmq_cli.trainer import TrainConfig, Trainer

    config = TrainConfig(epochs=2, gate_steps=0, gate_share=0.5, probe_batches=1, finish_table="predicted")
    assert (config.gate_length(8, 0), config.gate_tail(8)) == (4, 4)
    assert config.train_steps(8) == [4, 8]
    assert config.lr_at(8, 0, 0) == config.lr and config.lr_at(8, 1, 0) < config.lr  # the tail's 4 steps came first
    whole = TrainConfig(epochs=2, gate_steps=0)
    assert (whole.gate_length(8, 0), whole.gate_tail(8), whole.train_steps(8)) == (8, 0, [0, 8])

    qm = prepared()
    torch.manual_seed(0)
    x = torch.randn(128, 64)
    loader = DataLoader(TensorDataset(x, qm.gm(x).argmax(1)), batch_size=16)  # 8 batches
    qm.set_bits({"big": (8, 8), "small": (8, 8)})
    trainer = Trainer(qm, loader, loader, Budget(rel_bops=100.0), config)
    steps: list[tuple[str, int]] = []
    trainer.on_event = lambda e: steps.append((e.data["phase"], e.data["steps"])) if e.kind == "progress" else None
    weights = [p.detach().clone() for p in qm.weight_params()]
    info = trainer.gate_epoch(0)
    assert {s for s in steps} == {("gate", 4), ("weight", 4)} and info["tail_steps"] == 4
    assert any(not torch.equal(a, p) for a, p in zip(weights, qm.weight_params()))  # the tail trained the weights
    assert info["tail_train_loss"] > 0
