"""Exact rewrites of attention subgraphs into the form TensorRT fuses (and quantizes) best.

TensorRT's fused attention expects the attention scale on Q (or K) *before* the first batched
MatMul (``softmax((Q·s)·Kᵀ + mask)·V``), not on the scores after it; PyTorch code (and its ONNX
export) usually writes ``(Q·Kᵀ)·s``. :func:`move_attention_scale` moves a constant scalar ``Mul``
(or ``Div``) that follows a MatMul of two activations feeding a Softmax onto the MatMul's first
operand. ``(Q·Kᵀ)·s = (Q·s)·Kᵀ`` exactly in real arithmetic (and bit for bit when ``s`` is a power
of two, as ``1/sqrt(d_head)`` is for d_head = 4, 16, 64...).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeq.graph.analysis import constant_value, find_activation_matmuls


def move_attention_scale(model: onnx.ModelProto) -> list[str]:
    """Rewrite ``Mul(MatMul(a, b), s)`` → ``MatMul(Mul(a, s), b)`` for attention scores (in place).

    Only a scalar constant ``s`` and a MatMul whose output has that one consumer are rewritten.
    Returns the names of the moved scale nodes.
    """
    g = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    by_name = {n.name: n for n in g.node}
    moved: list[str] = []
    replace: dict[int, list[onnx.NodeProto]] = {}
    drop: set[int] = set()
    new_inits: list[onnx.TensorProto] = []
    for am in find_activation_matmuls(model):
        if am.role != "attention-scores":
            continue
        mm = by_name.get(am.node)
        if mm is None:
            continue
        cons = consumers.get(mm.output[0], [])
        if len(cons) != 1 or cons[0].op_type not in ("Mul", "Div") or mm.output[0] in {o.name for o in g.output}:
            continue
        sc = cons[0]
        other = [i for i in sc.input if i != mm.output[0]]
        if len(other) != 1 or (sc.op_type == "Div" and sc.input[0] != mm.output[0]):
            continue
        value = constant_value(model, other[0])
        if value is None or np.asarray(value).size != 1 or not np.isfinite(value).all() or float(value) == 0.0:
            continue
        s = float(np.asarray(value).reshape(())) if sc.op_type == "Mul" else 1.0 / float(np.asarray(value).reshape(()))
        base = (mm.name or mm.output[0]).replace("/", "_")
        s_name = f"{base}.attention_scale"
        new_inits.append(numpy_helper.from_array(np.array(s, np.float32), s_name))
        scaled = f"{base}.scaled_query"
        pre = helper.make_node("Mul", [mm.input[0], s_name], [scaled], name=f"{mm.name}/attention_scale")
        new_mm = onnx.NodeProto()
        new_mm.CopyFrom(mm)
        new_mm.input[0] = scaled
        new_mm.output[0] = sc.output[0]
        replace[id(mm)] = [pre, new_mm]
        drop.add(id(sc))
        moved.append(sc.name or sc.output[0])
    if not moved:
        return []
    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if id(n) in drop:
            continue
        nodes.extend(replace.get(id(n), [n]))
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    del g.value_info[:]
    return moved
