"""Apply a :class:`~edgeq.quantizers.plan.QuantPlan` to a float graph: TensorRT-style QDQ ONNX.

What the result obeys (``shared`` TensorRT QDQ rules; checked by :mod:`edgeq.export.trt_rules`):

* QuantizeLinear/DequantizeLinear only (no QLinear*/Integer ops), opset >= 13;
* symmetric int8: every zero point is an int8 0, scales are positive finite initializers;
* each INT8 layer's data input gets one per-tensor Q→DQ pair (shared by layers reading the same
  tensor), and its weight is stored as an **int8 initializer** → DequantizeLinear on the
  output-channel axis with narrow range [-127, 127];
* bias stays float; layer outputs and graph outputs carry no Q/DQ.

An INT8 ``Gemm`` is written as ``MatMul`` (weight stored [K, N], per-channel axis 1) followed by a
float ``Add`` of the bias. Both forms mean the same to TensorRT (it fuses the bias add into the
int8 GEMM), but ONNX Runtime's CPU QDQ fusion only turns ``DQ → Gemm`` into an integer kernel when
the bias is an int32 DequantizeLinear (which TensorRT rejects), whereas ``DQ, DQ → MatMul``
becomes ``MatMulIntegerToFloat`` (int8 GEMM with the float rescale inside). So this form is the
one both runtimes execute in int8.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeq.quantizers.plan import QuantPlan

MIN_OPSET = 13


def _set_opset(model: onnx.ModelProto, minimum: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < minimum:
            op.version = minimum


def apply_plan(model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """Return a new QDQ model; ``model`` is left untouched."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    graph = m.graph
    int8 = {layer.node: layer for layer in plan.int8_layers()}
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1

    new_inits: list[onnx.TensorProto] = []
    dq_of_tensor: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    removed_weights: set[str] = set()

    def add_init(array: np.ndarray, name: str) -> str:
        new_inits.append(numpy_helper.from_array(array, name))
        return name

    for node in graph.node:
        layer = int8.get(node.name)
        if layer is None:
            new_nodes.append(node)
            continue
        x = layer.input
        if x not in dq_of_tensor:
            act = plan.activations[x]
            base = x.replace("/", "_")
            scale = add_init(np.array(act.scale, np.float32), f"{base}.act_scale")
            zp = add_init(np.array(0, np.int8), f"{base}.act_zero_point")
            q = f"{base}.q"
            dq = f"{base}.dq"
            new_nodes.append(helper.make_node("QuantizeLinear", [x, scale, zp], [q], name=f"{base}/QuantizeLinear"))
            new_nodes.append(helper.make_node("DequantizeLinear", [q, scale, zp], [dq],
                                              name=f"{base}/DequantizeLinear"))
            dq_of_tensor[x] = dq
        qw = layer.weight
        assert qw is not None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        as_matmul = node.op_type == "MatMul" or (
            attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0))
        q, axis = qw.q, layer.weight_axis
        if as_matmul and node.op_type == "Gemm" and axis == 0:  # stored [N, K] → [K, N]
            q, axis = np.ascontiguousarray(q.T), 1
        wbase = layer.weight_name
        w_q = add_init(q.astype(np.int8), f"{wbase}.int8")
        w_s = add_init(qw.scale.astype(np.float32), f"{wbase}.scale")
        w_z = add_init(np.zeros(qw.scale.shape, np.int8), f"{wbase}.zero_point")
        w_dq = f"{wbase}.dq"
        new_nodes.append(helper.make_node("DequantizeLinear", [w_q, w_s, w_z], [w_dq],
                                          name=f"{wbase}/DequantizeLinear", axis=axis))
        if consumers.get(layer.weight_name, 0) == 1 and layer.weight_name in inits:
            removed_weights.add(layer.weight_name)
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        if as_matmul:
            out = node.output[0]
            mm_out = f"{out}.matmul" if bias else out
            new_nodes.append(helper.make_node("MatMul", [dq_of_tensor[x], w_dq], [mm_out], name=node.name))
            if bias:
                new_nodes.append(helper.make_node("Add", [mm_out, bias], [out], name=f"{node.name}/bias"))
        else:
            q_node = onnx.NodeProto()
            q_node.CopyFrom(node)
            del q_node.input[:]
            q_node.input.extend([dq_of_tensor[x], w_dq, *node.input[2:]])
            new_nodes.append(q_node)

    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [t for t in graph.initializer if t.name not in removed_weights]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    _set_opset(m, MIN_OPSET)
    m.doc_string = "edgeq INT8 QDQ policy"
    onnx.checker.check_model(m, full_check=True)
    return m
