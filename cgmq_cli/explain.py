"""Why these bits: one entry per quantizer for report.json's ``tensors`` (read by ``cgmq report --explain``).

Each entry says what a step up or down of that tensor's width would do, from
the second-order predictions of the final probe set (``pred``: key -> width ->
loss change, :func:`cgmq_cli.probes.predict`) and the exact cost model::

    predicted_dloss_up   = pred[key][next wider]  - pred[key][width]   (null at the top width)
    cost_up[k]           = C_k(widths with key one step up) - C_k(widths)  for every metric k
    bound_by             = the budgets that one step up would violate
"""

from __future__ import annotations

from typing import Mapping

from cgmq_cli.cgmq import CostModel, Widths

Predictions = Mapping[str, Mapping[int, float]]


def tensor_entries(qm, costs: CostModel, pred: Predictions) -> list[dict]:
    """The ``tensors`` list of report.json, in the quantizers' insertion order."""
    widths: Widths = qm.widths()
    here = costs.values(widths)
    out = []
    for key, q in qm.tensor_quantizers().items():
        info = qm.tensors[key]
        i = q.allowed.index(widths[key])
        up = q.allowed[i + 1] if i + 1 < len(q.allowed) else None
        down = q.allowed[i - 1] if i > 0 else None
        table = pred.get(key)
        entry = {"key": key, "label": info.label, "kind": info.kind, "width": widths[key], "allowed": list(q.allowed),
                 "gated": len(q.allowed) > 1}
        after = {name: None if other is None else costs.values({**widths, key: other})
                 for name, other in (("up", up), ("down", down))}
        for name, other in (("up", up), ("down", down)):
            entry[f"predicted_dloss_{name}"] = (None if other is None or table is None
                                                else float(table[other]) - float(table[widths[key]]))
        for name in ("up", "down"):
            entry[f"cost_{name}"] = None if after[name] is None else {k: after[name][k] - here[k] for k in here}
        entry["bound_by"] = ([] if after["up"] is None
                             else [k for k, lim in costs.budget.limits().items() if after["up"][k] > lim])
        entry["layers"] = [s.name for s, _ in costs.uses.get(key, ())]
        out.append(entry)
    return out
