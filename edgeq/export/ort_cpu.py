"""A CPU-specialized copy of the INT8 QDQ graph for ONNX Runtime (same arithmetic, fewer nodes).

ONNX Runtime's CPU provider rewrites edgeq's TensorRT-style layers
``Q(s8) → DQ, DQ(int8 W) → MatMul → Add(bias)`` into ``QuantizeLinear → MatMulIntegerToFloat →
Add`` and converts int8 activations to uint8 (x86's fast u8×s8 kernels). At batch 1 a policy's
layers are tiny, so the per-node cost dominates: this module writes that form directly, with the
bias inside ``MatMulIntegerToFloat`` (its optional 7th input), so each layer is two kernels.

The arithmetic is that of the QDQ graph: an activation quantized to uint8 with zero point 128 is
exactly the symmetric int8 value plus 128 (same scale, same rounding, same saturation), and
``MatMulIntegerToFloat`` subtracts the zero point before its integer GEMM. (Quantizing post-ReLU
activations to uint8 with zero point 0 would drop the ``Relu`` kernels too, but it changes the
saturation point, so the CPU file would no longer compute what the TensorRT file computes; measured
gain ~0.3 µs per call at batch 1, not worth a second arithmetic.) The portable ``policy.int8.onnx``
stays the artifact for TensorRT and other runtimes; the CPU target validates this file, since it is
the one that runs there.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


def specialize_for_ort_cpu(qdq: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite every INT8 MatMul(+bias Add) of an edgeq QDQ graph into MatMulIntegerToFloat."""
    m = onnx.ModelProto()
    m.CopyFrom(qdq)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    graph_outputs = {o.name for o in g.output}
    drop: set[int] = set()
    replace: dict[int, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    u8_of_q: dict[str, str] = {}
    for node in g.node:
        if node.op_type != "MatMul":
            continue
        a_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
        if a_dq is None or w_dq is None or a_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(a_dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or w_dq.input[0] not in inits:
            continue
        # activation: Q(int8, zp 0) → Q(uint8, zp 128), shared by every layer reading it
        if q.output[0] not in u8_of_q:
            zp_name = f"{q.output[0]}.u8_zero_point"
            src = q.input[0]
            new_inits.append(numpy_helper.from_array(np.array(128, np.uint8), zp_name))
            u8 = f"{q.output[0]}.u8"
            replace[id(q)] = [helper.make_node("QuantizeLinear", [src, q.input[1], zp_name], [u8],
                                               name=f"{q.name}.u8")]
            u8_of_q[q.output[0]] = u8
        add = None
        users = consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == "Add":
            cand = users[0]
            other = cand.input[1] if cand.input[0] == node.output[0] else cand.input[0]
            if other in inits and numpy_helper.to_array(inits[other]).ndim == 1:
                add = (cand, other)
        inputs = [u8_of_q[q.output[0]], w_dq.input[0], a_dq.input[1], w_dq.input[1],
                  f"{q.output[0]}.u8_zero_point", w_dq.input[2] if len(w_dq.input) > 2 else ""]
        outputs = [node.output[0]]
        if add is not None:
            inputs.append(add[1])
            outputs = [add[0].output[0]]
            drop.add(id(add[0]))
        replace[id(node)] = [helper.make_node("MatMulIntegerToFloat", inputs, outputs, name=node.name,
                                              domain=MS_DOMAIN)]
        drop.update({id(a_dq), id(w_dq)})

    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if id(n) in replace:
            nodes.extend(replace[id(n)])
        elif id(n) not in drop:
            nodes.append(n)
    nodes = _bypass_output_identities(nodes, graph_outputs)
    used = {i for n in nodes for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(kept + [t for t in new_inits if t.name in used])
    if not any(op.domain == MS_DOMAIN for op in m.opset_import):
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    m.doc_string = "edgeq INT8 policy specialized for ONNX Runtime CPU (same arithmetic as the QDQ graph)"
    onnx.checker.check_model(m)
    return m


def _bypass_output_identities(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """Let the node feeding an ``Identity → graph output`` write the output itself (one kernel less)."""
    out = list(nodes)
    for ident in [n for n in nodes if n.op_type == "Identity" and n.output[0] in outputs]:
        src = ident.input[0]
        producers = [n for n in out if src in n.output]
        users = [n for n in out if src in n.input]
        if len(producers) != 1 or len(users) != 1:
            continue
        p = producers[0]
        p.output[list(p.output).index(src)] = ident.output[0]
        out.remove(ident)
    return out
