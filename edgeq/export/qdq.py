"""Apply a :class:`~edgeq.quantizers.plan.QuantPlan` to a float graph: TensorRT-style QDQ ONNX.

What the result obeys (``shared`` TensorRT QDQ rules; checked by :mod:`edgeq.export.trt_rules`):

* QuantizeLinear/DequantizeLinear only (no QLinear*/Integer ops), opset >= 13;
* symmetric int8: every zero point is an int8 0, scales are positive finite initializers;
* each MatMul of two activations in the plan's ``matmuls`` (attention's Q·Kᵀ and A·V) gets a
  per-tensor Q→DQ pair on **both** inputs, so TensorRT runs it in int8; Softmax, LayerNorm and
  residual Adds get none and stay float;
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

Beyond plain int8 layers a plan may hold:

* exact float rewrites (:class:`~edgeq.quantizers.transforms.InputScaling`: static CrossQuant and
  equalization), applied to the float graph first; their ``Mul`` pre-ops stay fp32;
* a corrected float bias for an int8 layer (bias correction): a new float initializer;
* **fp16** layers (the most sensitive ones, when int8 cannot keep the actions): ``Cast(x → fp16)
  → MatMul(x16, W16) [→ Add(b16)] → Cast(→ fp32)`` with the weight and bias stored as fp16
  initializers, so TensorRT's strongly typed builder runs the layer in fp16 and ONNX Runtime's CPU
  provider (which has fp16 MatMul/Add kernels) runs the same graph; no Q/DQ touches them;
* **int4** layers (W4A8, :mod:`edgeq.export.int4`): int8 input Q/DQ as above, INT4 weight initializer
  per channel or in blocks (opset 21);
* **CrossQuant-dynamic** layers (:mod:`edgeq.quantizers.crossquant`): run-time per-row scales with
  ``MatMulInteger``; ONNX Runtime CPU only, and the plan says ``tensorrt_compatible: false``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeq.export.int4 import lower_int4_layers
from edgeq.quantizers.crossquant import dynamic_layer_nodes
from edgeq.quantizers.plan import LayerQuant, QuantPlan
from edgeq.quantizers.transforms import apply_input_scalings

MIN_OPSET = 13


def _set_opset(model: onnx.ModelProto, minimum: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < minimum:
            op.version = minimum


def _opset(model: onnx.ModelProto) -> int:
    return max((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), default=MIN_OPSET)


def _fp16_layer(node: onnx.NodeProto, layer: LayerQuant, w: np.ndarray, bias: np.ndarray | None,
                add_init: Any) -> list[onnx.NodeProto]:
    """``Cast → MatMul [→ Add] → Cast`` with fp16 weight/bias initializers (weight stored [K, N])."""
    x = node.input[0]
    base = layer.node.replace("/", "_")
    wt = np.ascontiguousarray(w.T) if layer.weight_axis == 0 else w
    w16 = add_init(wt.astype(np.float16), f"{layer.weight_name}.fp16")
    x16 = f"{base}.input_fp16"
    mm = f"{base}.matmul_fp16"
    nodes = [helper.make_node("Cast", [x], [x16], name=f"{base}/cast_fp16", to=onnx.TensorProto.FLOAT16),
             helper.make_node("MatMul", [x16, w16], [mm], name=node.name)]
    y16 = mm
    if bias is not None:
        b16 = add_init(bias.astype(np.float16), f"{layer.bias_name or base}.fp16")
        y16 = f"{base}.out_fp16"
        nodes.append(helper.make_node("Add", [mm, b16], [y16], name=f"{node.name}/bias"))
    nodes.append(helper.make_node("Cast", [y16], [node.output[0]], name=f"{base}/cast_fp32",
                                  to=onnx.TensorProto.FLOAT))
    return nodes


def apply_plan(model: onnx.ModelProto, plan: QuantPlan, *, check: bool = True) -> onnx.ModelProto:
    """Return a new quantized model; ``model`` (the original float graph) is left untouched.

    ``check=False`` skips ONNX's full model check (for the many candidate graphs of a search).
    """
    m = apply_input_scalings(model, plan.transforms) if plan.transforms else onnx.ModelProto()
    if not plan.transforms:
        m.CopyFrom(model)
    graph = m.graph
    opset = max(_opset(m), MIN_OPSET)
    int8 = {layer.node: layer for layer in plan.int8_layers()}
    fp16 = {layer.node: layer for layer in plan.layers if layer.precision == "fp16"}
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

    def bias_value(layer: LayerQuant, node: onnx.NodeProto) -> np.ndarray | None:
        if layer.bias is not None:
            return np.asarray(layer.bias, np.float32).reshape(-1)
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            return np.asarray(numpy_helper.to_array(inits[node.input[2]]), np.float32).reshape(-1)
        return None

    def dq_for(x: str) -> str:
        """The DequantizeLinear output of activation ``x`` (one per-tensor Q→DQ pair per tensor, shared)."""
        if x not in dq_of_tensor:
            act = plan.activations[x]
            base = x.replace("/", "_")
            scale = add_init(np.array(act.scale, np.float32), f"{base}.act_scale")
            zp = add_init(np.array(0, np.int8), f"{base}.act_zero_point")
            q_name = f"{base}.q"
            dq = f"{base}.dq"
            new_nodes.append(helper.make_node("QuantizeLinear", [x, scale, zp], [q_name],
                                              name=f"{base}/QuantizeLinear"))
            new_nodes.append(helper.make_node("DequantizeLinear", [q_name, scale, zp], [dq],
                                              name=f"{base}/DequantizeLinear"))
            dq_of_tensor[x] = dq
        return dq_of_tensor[x]

    act_matmuls = {m.node: m for m in plan.int8_matmuls()}
    for node in graph.node:
        if node.name in act_matmuls:  # both activation inputs per-tensor int8 (attention Q·Kᵀ, A·V)
            mm = onnx.NodeProto()
            mm.CopyFrom(node)
            del mm.input[:]
            mm.input.extend([dq_for(x) for x in node.input])
            new_nodes.append(mm)
            continue
        if node.name in fp16:
            half = fp16[node.name]
            if node.op_type == "Gemm":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
                    raise ValueError(f"layer {node.name}: fp16 export supports Gemm with alpha=beta=1, transA=0")
            w = numpy_helper.to_array(inits[half.weight_name])
            new_nodes.extend(_fp16_layer(node, half, w, bias_value(half, node), add_init))
            if consumers.get(half.weight_name, 0) == 1:
                removed_weights.add(half.weight_name)
            if node.op_type == "Gemm" and len(node.input) > 2 and consumers.get(node.input[2], 0) == 1:
                removed_weights.add(node.input[2])
            continue
        layer = int8.get(node.name)
        if layer is None:
            new_nodes.append(node)
            continue
        x = layer.input
        if layer.scheme == "crossquant-dynamic":
            qw = layer.weight
            assert qw is not None and layer.dynamic_factors is not None and layer.dynamic_alpha is not None
            q_kn = qw.q.T if layer.weight_axis == 0 else qw.q
            b = bias_value(layer, node)
            bname = add_init(b, f"{layer.node.replace('/', '_')}.bias_f32") if b is not None else None
            nodes, dyn_inits = dynamic_layer_nodes(x, node.output[0], layer.node.replace("/", "_") + ".cq",
                                                   np.ascontiguousarray(q_kn), qw.scale, bname,
                                                   layer.dynamic_factors, layer.dynamic_alpha, opset)
            new_nodes.extend(nodes)
            new_inits.extend(dyn_inits)
            if consumers.get(layer.weight_name, 0) == 1 and layer.weight_name in inits:
                removed_weights.add(layer.weight_name)
            if node.op_type == "Gemm" and len(node.input) > 2 and consumers.get(node.input[2], 0) == 1:
                removed_weights.add(node.input[2])
            continue
        dq_for(x)
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
        if bias and layer.bias is not None:
            if consumers.get(bias, 0) == 1:
                removed_weights.add(bias)
            bias = add_init(np.asarray(layer.bias, np.float32).reshape(inits[bias].dims),
                            f"{bias}.corrected")
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
            q_node.input.extend([dq_of_tensor[x], w_dq, *([bias] if bias else node.input[2:])])
            new_nodes.append(q_node)

    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [t for t in graph.initializer if t.name not in removed_weights]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    _set_opset(m, MIN_OPSET)
    lower_int4_layers(m, plan)  # int4 layers (W4A8, edgeq.export.int4): left as float nodes above
    m.doc_string = "edgeq INT8 QDQ policy" if plan.tensorrt_compatible else \
        "edgeq INT8 policy (CrossQuant dynamic layers: ONNX Runtime only, not TensorRT-compatible)"
    if plan.int4_layers():
        m.doc_string = "edgeq mixed-precision QDQ policy (int4 weights with int8 activations: W4A8)"
    if check:
        onnx.checker.check_model(m, full_check=True)
    return m
