"""Graph edits on an IR (``onnx_ir``): the one graph index every edgeq pass works on.

A pass reads a ``ModelProto`` into :class:`onnx_ir.Model` (:func:`to_ir`), edits it through the IR's
own index (``Value.producer()``, ``Value.uses()``, ``replace_all_uses_with``, ``Graph.insert_before``
/ ``remove``) instead of rebuilding producer/consumer dictionaries over ``graph.node``, and writes it
back with :func:`to_onnx`, which keeps what edgeq's files always held: the source's ``value_info``
(and no other), metadata in insertion order, and every name chosen by the pass. Names are derived
from layer and tensor names only (no counters, no ids), so the same input gives the same bytes.

Workstation side only: ``edgeq.deploy`` never imports this module (import-linter's robot-side
contract forbids ``onnx_ir`` there).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

__all__ = [
    "array_of",
    "check",
    "const",
    "drop_unused_initializers",
    "make_node",
    "op",
    "remove_dead_code",
    "replace_node",
    "rewire",
    "to_ir",
    "to_onnx",
]


def to_ir(model: onnx.ModelProto) -> ir.Model:
    """An IR copy of ``model`` (``model`` itself is never modified by edits of the copy)."""
    return ir.from_proto(model)


def _opsets_like(proto: onnx.ModelProto, versions: dict[str, int], like: onnx.ModelProto) -> None:
    """The source's opset entries, as written (an implicit default domain, duplicates), at the new versions;
    domains the source lacked after them."""
    entries, seen = [], set()
    for entry in like.opset_import:
        key = "" if entry.domain == "ai.onnx" and "ai.onnx" not in versions else entry.domain
        if key in versions:
            copy = onnx.OperatorSetIdProto()
            copy.CopyFrom(entry)
            copy.version = versions[key]
            entries.append(copy)
            seen.add(key)
    entries += [onnx.helper.make_opsetid(d, v) for d, v in versions.items() if d not in seen]
    del proto.opset_import[:]
    proto.opset_import.extend(entries)


_MODEL_FIELDS = ("producer_name", "producer_version", "domain", "model_version", "doc_string")


def to_onnx(model: ir.Model, like: onnx.ModelProto | None = None, *, value_info: bool = True) -> onnx.ModelProto:
    """Serialize ``model`` as its source ``like`` was written: only ``like``'s ``value_info``, metadata in
    insertion order, ``like``'s opset entries as written, its explicitly empty fields.

    ``onnx_ir`` writes a ``value_info`` for every typed value, sorts metadata keys, merges duplicate
    opset entries, writes the default domain and leaves empty fields out; edgeq's files carry what
    their source carried, so that an edit leaves the bytes of everything it did not touch as they
    were. ``value_info=False`` drops them all.
    """
    proto = ir.to_proto(model)
    del proto.graph.value_info[:]
    if like is not None and value_info:
        proto.graph.value_info.extend(like.graph.value_info)
    del proto.metadata_props[:]
    for key, value in model.metadata_props.items():
        proto.metadata_props.add(key=key, value=value)
    if like is None:
        return proto
    _opsets_like(proto, dict(model.opset_imports), like)
    for mine, theirs, fields in ((proto, like, _MODEL_FIELDS), (proto.graph, like.graph, ("name", "doc_string"))):
        for f in fields:  # an empty field the source wrote explicitly (onnx_ir writes only non-empty ones)
            if theirs.HasField(f) and not mine.HasField(f) and not getattr(theirs, f):
                setattr(mine, f, getattr(theirs, f))
    return proto


def check(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX's full check (schema, types, strict shape inference) of a pass's output; returns ``model``."""
    onnx.checker.check_model(model, full_check=True)
    return model


def const(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    """Register ``array`` as initializer ``name`` (appended after the existing ones) and return its value."""
    value = ir.Value(name=name, const_value=ir.Tensor(np.asarray(array), name=name))
    graph.register_initializer(value)
    return value


def array_of(value: ir.Value | None) -> np.ndarray | None:
    """The constant held by an initializer value (None for a computed value or a missing input)."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def make_node(op_type: str, inputs: Sequence[ir.Value | None], output: str | Sequence[str], *, name: str,
              domain: str = "", **attributes: Any) -> ir.Node:
    """A detached node writing values named ``output``; attributes in name order (as ``onnx.helper``)."""
    outs = [output] if isinstance(output, str) else list(output)
    attrs = ir.convenience.convert_attributes(dict(sorted(attributes.items())))
    return ir.Node(domain, op_type, inputs, attrs, outputs=[ir.Value(name=o) for o in outs], name=name)


def op(nodes: list[ir.Node], op_type: str, inputs: Sequence[ir.Value | None], output: str, *, name: str,
       domain: str = "", **attributes: Any) -> ir.Value:
    """Append a one-output node to ``nodes`` and return its output value (for chains of new nodes)."""
    node = make_node(op_type, inputs, output, name=name, domain=domain, **attributes)
    nodes.append(node)
    return node.outputs[0]


def rewire(before: ir.Value, after: ir.Value) -> None:
    """Every reader (and graph output) of ``before`` reads ``after``, which takes ``before``'s name and type."""
    name = before.name
    after.type = before.type if before.type is not None else after.type
    after.shape = before.shape if before.shape is not None else after.shape
    before.replace_all_uses_with(after, replace_graph_outputs=True)
    before.name = None
    after.name = name


def replace_node(graph: ir.Graph, old: ir.Node | Sequence[ir.Node], new: Iterable[ir.Node],
                 outputs: Mapping[ir.Value, ir.Value]) -> None:
    """Put ``new`` where the first of ``old`` stood; ``outputs`` maps each old value read later to its new one.

    Every reader (and graph output) of an old value reads the new one, which takes the old value's
    name (:func:`rewire`); then the old nodes leave the graph and stop reading their inputs.
    """
    olds = [old] if isinstance(old, ir.Node) else list(old)
    new = list(new)
    if new:
        graph.insert_before(olds[0], new)
    for before, after in outputs.items():
        rewire(before, after)
    graph.remove(olds, safe=True)


def drop_unused_initializers(graph: ir.Graph, values: Iterable[ir.Value | None]) -> None:
    """Remove those of ``values`` that are initializers nothing reads any more (order of the rest kept)."""
    outputs = set(graph.outputs)
    for value in values:
        name = None if value is None else value.name
        if (value is not None and name is not None and value.is_initializer() and not value.uses()
                and value not in outputs and name in graph.initializers):
            del graph.initializers[name]


def remove_dead_code(graph: ir.Graph) -> None:
    """Remove nodes none of whose outputs is read (or is a graph output), then initializers nothing reads.

    Not ``onnx_ir.passes.common.RemoveUnusedNodesPass``: besides dead nodes it renames a live node's
    unused optional outputs (an LSTM's ``Y``) and drops trailing empty inputs, which would change
    nodes a pass did not touch.
    """
    outputs = set(graph.outputs)
    for node in reversed(list(graph)):
        if not any(o.uses() or o in outputs for o in node.outputs):
            graph.remove(node, safe=True)
    drop_unused_initializers(graph, list(graph.initializers.values()))
