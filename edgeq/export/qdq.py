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

import numpy as np
import onnx
import onnx_ir as ir

from edgeq.export.int4 import lower_int4_layers
from edgeq.graph.ir import array_of, const, drop_unused_initializers, make_node, op, replace_node, to_ir, to_onnx
from edgeq.graph.ir import check as full_check
from edgeq.quantizers.crossquant import dynamic_layer_nodes
from edgeq.quantizers.input_split import insert_input_splits
from edgeq.quantizers.plan import LayerQuant, QuantPlan
from edgeq.quantizers.split import apply_splits
from edgeq.quantizers.transforms import scale_inputs

MIN_OPSET = 13
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def _gemm_plain(node: ir.Node) -> bool:
    """A Gemm that is a MatMul plus bias: alpha = beta = 1, no transposed A."""
    attrs = node.attributes
    return (attrs.get_float("alpha", 1.0) == 1.0 and attrs.get_float("beta", 1.0) == 1.0
            and not attrs.get_int("transA", 0))


def _gemm_bias(node: ir.Node) -> ir.Value | None:
    return node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None


class _Lowering:
    """One plan applied to one IR graph (each method rewrites one kind of layer in place)."""

    def __init__(self, model: ir.Model, plan: QuantPlan) -> None:
        self.graph, self.plan = model.graph, plan
        self.opset = max(model.opset_imports.get("", MIN_OPSET), MIN_OPSET)
        self.dq_of: dict[str, ir.Value] = {}
        self.touched: list[ir.Value | None] = []

    def bias_value(self, layer: LayerQuant, node: ir.Node) -> np.ndarray | None:
        if layer.bias is not None:
            return np.asarray(layer.bias, np.float32).reshape(-1)
        b = array_of(_gemm_bias(node))
        return None if b is None else np.asarray(b, np.float32).reshape(-1)

    def dq_for(self, x: ir.Value, before: ir.Node) -> ir.Value:
        """The DequantizeLinear output of activation ``x`` (one per-tensor Q→DQ pair per tensor, shared)."""
        assert x.name is not None
        if x.name not in self.dq_of:
            base = x.name.replace("/", "_")
            scale = const(self.graph, np.array(self.plan.activations[x.name].scale, np.float32), f"{base}.act_scale")
            zp = const(self.graph, np.array(0, np.int8), f"{base}.act_zero_point")
            nodes: list[ir.Node] = []
            q = op(nodes, "QuantizeLinear", [x, scale, zp], f"{base}.q", name=f"{base}/QuantizeLinear")
            self.dq_of[x.name] = op(nodes, "DequantizeLinear", [q, scale, zp], f"{base}.dq",
                                    name=f"{base}/DequantizeLinear")
            self.graph.insert_before(before, nodes)
        return self.dq_of[x.name]

    def act_matmul(self, node: ir.Node) -> None:
        """Both activation inputs per-tensor int8 (attention's Q·Kᵀ, A·V)."""
        for i, x in enumerate(list(node.inputs)):
            assert x is not None
            node.replace_input_with(i, self.dq_for(x, node))

    def fp16(self, node: ir.Node, layer: LayerQuant) -> None:
        """``Cast → MatMul [→ Add] → Cast`` with fp16 weight/bias initializers (weight stored [K, N])."""
        if node.op_type == "Gemm" and not _gemm_plain(node):
            raise ValueError(f"layer {node.name}: fp16 export supports Gemm with alpha=beta=1, transA=0")
        w_value = self.graph.initializers[layer.weight_name]
        w = array_of(w_value)
        assert w is not None
        bias = self.bias_value(layer, node)
        base = layer.node.replace("/", "_")
        wt = np.ascontiguousarray(w.T) if layer.weight_axis == 0 else w
        w16 = const(self.graph, wt.astype(np.float16), f"{layer.weight_name}.fp16")
        nodes: list[ir.Node] = []
        x16 = op(nodes, "Cast", [node.inputs[0]], f"{base}.input_fp16", name=f"{base}/cast_fp16", to=FLOAT16)
        y16 = op(nodes, "MatMul", [x16, w16], f"{base}.matmul_fp16", name=node.name or "")
        if bias is not None:
            b16 = const(self.graph, bias.astype(np.float16), f"{layer.bias_name or base}.fp16")
            y16 = op(nodes, "Add", [y16, b16], f"{base}.out_fp16", name=f"{node.name}/bias")
        y = op(nodes, "Cast", [y16], node.outputs[0].name or "", name=f"{base}/cast_fp32", to=FLOAT)
        self.touched += [w_value, _gemm_bias(node)]
        replace_node(self.graph, node, nodes, {node.outputs[0]: y})

    def dynamic(self, node: ir.Node, layer: LayerQuant, x: ir.Value) -> None:
        """A CrossQuant-dynamic layer (:func:`edgeq.quantizers.crossquant.dynamic_layer_nodes`)."""
        qw = layer.weight
        assert qw is not None and layer.dynamic_factors is not None and layer.dynamic_alpha is not None
        q_kn = qw.q.T if layer.weight_axis == 0 else qw.q
        b = self.bias_value(layer, node)
        base = layer.node.replace("/", "_")
        bias = const(self.graph, b, f"{base}.bias_f32") if b is not None else None
        nodes, y = dynamic_layer_nodes(self.graph, x, node.outputs[0].name or "", base + ".cq",
                                       np.ascontiguousarray(q_kn), qw.scale, bias, layer.dynamic_factors,
                                       layer.dynamic_alpha, self.opset)
        self.touched += [node.inputs[1], _gemm_bias(node)]
        replace_node(self.graph, node, nodes, {node.outputs[0]: y})

    def int8(self, node: ir.Node, layer: LayerQuant) -> None:
        """Activation Q→DQ, int8 weight → DQ (per output channel), MatMul [+ float bias Add]."""
        x = node.inputs[0]
        if x is None or x.name != layer.input:
            x = self._value(layer.input)
        if layer.scheme == "crossquant-dynamic":
            self.dynamic(node, layer, x)
            return
        qw = layer.weight
        assert qw is not None
        as_matmul = node.op_type == "MatMul" or _gemm_plain(node)
        denoise = None
        if layer.input_noise is not None:  # NoisyQuant: quantize X + N, subtract N · W_int8ᵀ after the GEMM
            if not as_matmul:
                raise ValueError(f"layer {node.name}: NoisyQuant's denoising bias needs a MatMul or a plain Gemm "
                                 "(alpha = beta = 1, transA = 0)")
            x_dq, denoise = self.noisy_input(x, node, layer)
        else:
            x_dq = self.dq_for(x, node)
        q, axis = qw.q, layer.weight_axis
        if as_matmul and node.op_type == "Gemm" and axis == 0:  # stored [N, K] → [K, N]
            q, axis = np.ascontiguousarray(q.T), 1
        wbase = layer.weight_name
        w_q = const(self.graph, q.astype(np.int8), f"{wbase}.int8")
        w_s = const(self.graph, qw.scale.astype(np.float32), f"{wbase}.scale")
        w_z = const(self.graph, np.zeros(qw.scale.shape, np.int8), f"{wbase}.zero_point")
        nodes = [make_node("DequantizeLinear", [w_q, w_s, w_z], f"{wbase}.dq", name=f"{wbase}/DequantizeLinear",
                           axis=axis)]
        w_dq = nodes[0].outputs[0]
        self.touched.append(self.graph.initializers.get(layer.weight_name))
        bias = _gemm_bias(node)
        if bias is not None and (layer.bias is not None or denoise is not None):
            self.touched.append(bias)
            b_old = array_of(bias)
            assert b_old is not None and bias.name is not None
            b_new = np.asarray(layer.bias if layer.bias is not None else b_old, np.float64).reshape(-1)
            if denoise is not None:
                b_new = b_new + denoise
                denoise = None
            bias = const(self.graph, b_new.astype(np.float32).reshape(b_old.shape), f"{bias.name}.corrected")
        if not as_matmul:  # the node stays, reading the dequantized tensors
            self.graph.insert_before(node, nodes)
            node.replace_input_with(0, x_dq)
            node.replace_input_with(1, w_dq)
            if bias is not None:
                node.replace_input_with(2, bias)
            return
        out = node.outputs[0].name or ""
        if denoise is not None:  # a layer without a bias of its own (MatMul): the denoising bias as an Add
            bias = const(self.graph, denoise.astype(np.float32), f"{wbase}.denoise_bias")
        y = op(nodes, "MatMul", [x_dq, w_dq], f"{out}.matmul" if bias is not None else out, name=node.name or "")
        if bias is not None:
            y = op(nodes, "Add", [y, bias], out, name=f"{node.name}/bias")
        replace_node(self.graph, node, nodes, {node.outputs[0]: y})

    def noisy_input(self, x: ir.Value, node: ir.Node, layer: LayerQuant) -> tuple[ir.Value, np.ndarray]:
        """NoisyQuant: ``Add(X, N)`` (fp32 pre-op) and its own Q→DQ at ``X``'s scale; returns the DQ output and
        the denoising bias ``-N · W_int8ᵀ`` (the layer's int8 weight, so the noise cancels exactly)."""
        assert layer.input_noise is not None and layer.weight is not None and x.name is not None
        noise = np.asarray(layer.input_noise, np.float32).reshape(-1)
        wq = layer.weight.dequantize().astype(np.float64)
        wq = wq if layer.weight_axis == 0 else wq.T  # [out, in]
        denoise = -(wq @ noise.astype(np.float64))
        base = f"{layer.node}.noisy".replace("/", "_")
        n_val = const(self.graph, noise, f"{base}.noise")
        scale = const(self.graph, np.array(self.plan.activations[layer.input].scale, np.float32), f"{base}.act_scale")
        zp = const(self.graph, np.array(0, np.int8), f"{base}.act_zero_point")
        nodes: list[ir.Node] = []
        xn = op(nodes, "Add", [x, n_val], f"{base}.input", name=f"{base}/Add")
        q = op(nodes, "QuantizeLinear", [xn, scale, zp], f"{base}.q", name=f"{base}/QuantizeLinear")
        dq = op(nodes, "DequantizeLinear", [q, scale, zp], f"{base}.dq", name=f"{base}/DequantizeLinear")
        self.graph.insert_before(node, nodes)
        return dq, denoise

    def _value(self, name: str) -> ir.Value:
        for v in (*self.graph.inputs, *self.graph.initializers.values()):
            if v.name == name:
                return v
        return next(o for n in self.graph for o in n.outputs if o.name == name)


def apply_plan(model: onnx.ModelProto, plan: QuantPlan, *, check: bool = True) -> onnx.ModelProto:
    """Return a new quantized model; ``model`` (the original float graph) is left untouched.

    ``check=False`` skips ONNX's full model check (for the many candidate graphs of a search).
    """
    # outlier channel splits (exact); the split graph is also the source its value_info is written like
    source = apply_splits(model, plan.splits) if plan.splits else model
    irm = to_ir(source)
    scale_inputs(irm.graph, plan.transforms)  # exact float rewrites first (their Mul pre-ops stay fp32)
    insert_input_splits(irm.graph, plan.input_splits)  # duplicated input columns (an fp32 Gather pre-op)
    low = _Lowering(irm, plan)
    int8 = {layer.node: layer for layer in plan.int8_layers()}
    fp16 = {layer.node: layer for layer in plan.layers if layer.precision == "fp16"}
    act_matmuls = {m.node for m in plan.int8_matmuls()}
    for node in list(irm.graph):
        if node.name in act_matmuls:
            low.act_matmul(node)
        elif node.name in fp16:
            low.fp16(node, fp16[node.name])
        elif node.name in int8:
            low.int8(node, int8[node.name])
    drop_unused_initializers(irm.graph, low.touched)
    for domain in ("", "ai.onnx"):
        if domain in irm.opset_imports and irm.opset_imports[domain] < MIN_OPSET:
            irm.opset_imports[domain] = MIN_OPSET
    irm.doc_string = "edgeq INT8 QDQ policy" if plan.tensorrt_compatible else \
        "edgeq INT8 policy (CrossQuant dynamic layers: ONNX Runtime only, not TensorRT-compatible)"
    if plan.int4_layers():
        irm.doc_string = "edgeq mixed-precision QDQ policy (int4 weights with int8 activations: W4A8)"
    out = to_onnx(irm, source)
    lower_int4_layers(out, plan)  # int4 layers (W4A8, edgeq.export.int4): left as float nodes above
    return full_check(out) if check else out
