"""Taking an exported graph down to an older opset: onnx's version converter, plus what it lacks.

torch.onnx writes opset 18 or newer; ``--opset`` 13-17 is reached here. The
converter may leave attributes the older schema lacks (dropped when they
hold the newer default) and has no 14 -> 13 adapters for several operators
(:func:`_relabel_14_to_13`).
"""

from __future__ import annotations

import re

import onnx

from cgmq_cli.errors import ExportError


def opset_of(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _drop_default_attributes(node: onnx.NodeProto, source: int, target: int) -> None:
    """Remove attributes the target schema lacks when they hold the newer schema's default.

    onnx's converter leaves e.g. ReduceMean's ``noop_with_empty_axes=0`` in
    place when going 18 -> 17; at its default it only restates old behaviour.
    """
    known = onnx.defs.get_schema(node.op_type, target).attributes
    newer = onnx.defs.get_schema(node.op_type, source).attributes
    keep = []
    for attr in node.attribute:
        if attr.name in known:
            keep.append(attr)
            continue
        default = newer[attr.name].default_value if attr.name in newer else None
        if default is None or not default.HasField("type") \
                or onnx.helper.get_attribute_value(default) != onnx.helper.get_attribute_value(attr):
            raise ExportError(f"cannot convert {node.op_type} to opset {target}: attribute `{attr.name}` is set",
                              "use --opset 18 or higher")
    del node.attribute[:]
    node.attribute.extend(keep)


def convert_down(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """onnx's version converter, keeping node and model metadata it may drop; 13 through :func:`_relabel_14_to_13`."""
    node_meta = {n.name: list(n.metadata_props) for n in model.graph.node if n.metadata_props}
    step = max(opset, 14)
    try:
        converted = onnx.version_converter.convert_version(model, step)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        adapter = re.search(r"No Adapter (?:From|To) Version \$(\d+) for (\w+)", text)
        reason = f"onnx's converter cannot take {adapter.group(2)} below opset {adapter.group(1)}" if adapter else text[:200]
        raise ExportError(f"cannot convert the graph to opset {opset}: {reason}", "use --opset 18 or higher") from None
    source = opset_of(model)
    for node in converted.graph.node:
        if node.name in node_meta and not node.metadata_props:
            node.metadata_props.extend(node_meta[node.name])
        if node.domain in ("", "ai.onnx"):
            _drop_default_attributes(node, source, step)
    if opset == 13:
        _relabel_14_to_13(converted)
    if not converted.metadata_props:
        converted.metadata_props.extend(model.metadata_props)
    return converted


def _relabel_14_to_13(model: onnx.ModelProto) -> None:
    """Opset 14 -> 13, which onnx's converter lacks adapters for (e.g. Relu).

    Every operator that changed at 14 only widened its types (Add, Sub, Mul,
    Div, Relu, Identity, CumSum) or added an attribute whose default keeps the
    opset-13 behaviour (Reshape's ``allowzero``, BatchNormalization's
    ``training_mode``, the recurrent ops' ``layout``); Trilu and HardSwish are
    new. So a node is relabelled when its operator exists at 13 and its
    attributes fit there; ``onnx.checker`` with ``full_check`` then checks
    every tensor's type against the opset-13 schemas. torch writes Reshape
    with ``allowzero=1``, which only differs from 13's behaviour where the
    target shape holds a 0: with a constant shape without zeros it is dropped.
    """
    constants = {t.name: t for t in model.graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in model.graph.node
                      if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"})
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            onnx.defs.get_schema(node.op_type, 13)
        except onnx.defs.SchemaError:
            raise ExportError(f"cannot convert the graph to opset 13: {node.op_type} is newer",
                              "use --opset 14 or higher") from None
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in constants \
                and 0 not in onnx.numpy_helper.to_array(constants[node.input[1]]).tolist():
            kept = [a for a in node.attribute if a.name != "allowzero"]  # no 0 in the shape: allowzero changes nothing
            del node.attribute[:]
            node.attribute.extend(kept)
        _drop_default_attributes(node, 14, 13)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 13
