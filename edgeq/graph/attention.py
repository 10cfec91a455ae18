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

from edgeq.graph.analysis import constant_value, find_activation_matmuls
from edgeq.graph.ir import const, make_node, rewire, to_ir, to_onnx


def move_attention_scale(model: onnx.ModelProto) -> list[str]:
    """Rewrite ``Mul(MatMul(a, b), s)`` → ``MatMul(Mul(a, s), b)`` for attention scores (in place).

    Only a scalar constant ``s`` and a MatMul whose output has that one consumer are rewritten.
    Returns the names of the moved scale nodes.
    """
    scores = {am.node for am in find_activation_matmuls(model) if am.role == "attention-scores"}
    irm = to_ir(model)
    g = irm.graph
    moved: list[str] = []
    for mm in [n for n in g if n.name in scores]:
        out = mm.outputs[0]
        uses = list(out.uses())
        if len(uses) != 1 or uses[0].node.op_type not in ("Mul", "Div") or out.is_graph_output():
            continue
        sc = uses[0].node
        other = [v for v in sc.inputs if v is not out]
        if len(other) != 1 or other[0] is None or (sc.op_type == "Div" and sc.inputs[0] is not out):
            continue
        value = constant_value(model, other[0].name or "")
        if value is None or np.asarray(value).size != 1 or not np.isfinite(value).all() or float(value) == 0.0:
            continue
        s = float(np.asarray(value).reshape(())) if sc.op_type == "Mul" else 1.0 / float(np.asarray(value).reshape(()))
        base = (mm.name or out.name or "").replace("/", "_")
        scale = const(g, np.array(s, np.float32), f"{base}.attention_scale")
        pre = make_node("Mul", [mm.inputs[0], scale], f"{base}.scaled_query", name=f"{mm.name}/attention_scale")
        g.insert_before(mm, pre)
        mm.replace_input_with(0, pre.outputs[0])
        moved.append(sc.name or sc.outputs[0].name or "")
        rewire(sc.outputs[0], out)  # the MatMul now writes what the scale node wrote
        g.remove(sc, safe=True)
    if moved:
        model.CopyFrom(to_onnx(irm, model, value_info=False))
    return moved
