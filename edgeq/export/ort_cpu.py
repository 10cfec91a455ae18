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

**Tiny layers run in float on the CPU** (``min_int8_width``, the ``cpu-ort`` profile's
``cpu_float_below``). ONNX Runtime's integer GEMM (``MatMulIntegerToFloat``) costs ~1.5-2 µs per
call on top of the arithmetic (it rebuilds the per-channel ``a_scale × b_scale`` multipliers and
packs A each call), while a float ``FusedGemm`` of a [17 → 256] or [256 → 6] layer takes ~0.4 µs:
for the observation and action layers of a policy the INT8 kernel never earns its overhead back
(measured in ``benchmarks/results/cpu.md``; NVIDIA's Model Optimizer leaves such GEMMs unquantized
for the same reason). A layer whose input or output width is below ``min_int8_width`` is written
as a float ``Gemm`` whose weight is ``Cast(int8 W) × scale`` (× the CrossQuant / equalization
column factors of its input, if any): the file still stores int8 weights, ONNX Runtime
constant-folds the expression into a float weight once at session load, and the layer's
activation is not quantized (so this layer is more precise on the CPU than in the TensorRT file).
An INT8 layer whose output (through a ``Relu``) feeds only such float layers hands its per-channel
weight scales to them: ``relu(a·w_j·acc_j + b_j) = w_j · relu(a·acc_j + b_j / w_j)`` for w_j > 0,
so ``MatMulIntegerToFloat`` gets a scalar weight scale (its cheap path: no per-call multiplier
vector) and the float layer's weight rows absorb w_j at load (exact up to float rounding).
The layers kept in float are listed in the model's ``edgeq.cpu_float_layers`` metadata and in the
manifest; the CPU target's validation runs this very file.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from edgeq.export.passes import bypass_output_identities, drop_zero_adds
from edgeq.graph.ir import array_of, check, const, op, remove_dead_code, replace_node, to_ir, to_onnx

MS_DOMAIN = "com.microsoft"


#: Default ``min_int8_width``: layers with fewer inputs or outputs than this run in float on the CPU.
DEFAULT_CPU_FLOAT_BELOW = 32
CPU_FLOAT_LAYERS_KEY = "edgeq.cpu_float_layers"
FLOAT = onnx.TensorProto.FLOAT


def cpu_float_layers(model: onnx.ModelProto) -> list[str]:
    """The layers that a CPU-specialized file runs in float (from its metadata; [] if none)."""
    for prop in model.metadata_props:
        if prop.key == CPU_FLOAT_LAYERS_KEY:
            return [str(x) for x in json.loads(prop.value)]
    return []


@dataclass(frozen=True)
class _Layer:
    """``Q → DQ(x), DQ(int8 W) → MatMul`` of an edgeq QDQ graph, and the bias ``Add`` that alone reads it."""

    matmul: ir.Node
    q: ir.Node
    a_dq: ir.Node
    w_dq: ir.Node
    add: ir.Node | None
    bias: ir.Value | None

    @property
    def name(self) -> str:
        return self.matmul.name or self.matmul.outputs[0].name or ""

    @property
    def nodes(self) -> list[ir.Node]:
        """The MatMul and its bias Add (the nodes the CPU form replaces)."""
        return [self.matmul, *([self.add] if self.add is not None else [])]

    @property
    def out(self) -> ir.Value:
        """The value the layer's result ends in (the bias Add's output, else the MatMul's)."""
        return (self.add or self.matmul).outputs[0]


def _made_by(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = None if value is None else value.producer()
    return node if node is not None and node.op_type == op_type else None


def _int8_layer(node: ir.Node) -> _Layer | None:
    if node.op_type != "MatMul":
        return None
    a_dq, w_dq = _made_by(node.inputs[0], "DequantizeLinear"), _made_by(node.inputs[1], "DequantizeLinear")
    q = None if a_dq is None else _made_by(a_dq.inputs[0], "QuantizeLinear")
    w = None if w_dq is None else w_dq.inputs[0]
    if q is None or a_dq is None or w_dq is None or w is None or not w.is_initializer():
        return None
    if w.const_value is None or w.const_value.dtype != ir.DataType.INT8:
        return None  # int4 weights (W4A8): edgeq.export.int4 writes those layers
    add, bias = None, None
    uses = list(node.outputs[0].uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add":  # a 1-D constant bias that alone reads the MatMul
        cand = uses[0].node
        other = cand.inputs[1] if cand.inputs[0] is node.outputs[0] else cand.inputs[0]
        if other is not None and other.is_initializer() and other.const_value is not None \
                and len(other.const_value.shape) == 1:
            add, bias = cand, other
    return _Layer(node, q, a_dq, w_dq, add, bias)


def _layers(graph: ir.Graph) -> list[_Layer]:
    return [layer for node in graph if (layer := _int8_layer(node)) is not None]


def int8_layer_names(qdq: onnx.ModelProto) -> list[str]:
    """The INT8 MatMul layers of an edgeq QDQ graph (the ones :func:`specialize_for_ort_cpu` rewrites)."""
    return [la.name for la in _layers(to_ir(qdq).graph)
            if la.q.inputs[1] is not None and la.q.inputs[1].is_initializer()]


def specialize_for_ort_cpu(qdq: onnx.ModelProto, min_int8_width: int = 0,
                           keep_int8: Collection[str] = (),
                           float_layers: Collection[str] | None = None) -> onnx.ModelProto:
    """Rewrite every INT8 MatMul(+bias Add) of an edgeq QDQ graph into MatMulIntegerToFloat.

    With ``min_int8_width`` > 0, layers whose input or output width is below it become float
    ``Gemm``s on their dequantized int8 weights instead (see the module docstring), except the
    nodes named in ``keep_int8`` (a recurrent cell's gate MatMuls: their int8 arithmetic is what
    the recurrent validation is about, so every target runs it). ``float_layers`` names the layers
    to run in float instead of the width rule (a measured or replayed choice, see
    :mod:`edgeq.export.cpu_select`).
    """
    model = to_ir(qdq)
    g = model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(qdq)
        ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*inferred.graph.value_info, *inferred.graph.input)
                 if v.type.tensor_type.HasField("shape")}
    except Exception:  # noqa: BLE001 - without shapes every layer is taken as 2-D, as before
        ranks = {}
    # every decision on the graph as it came (later edits must not change an earlier layer's reading)
    plan: list[tuple[_Layer, tuple[ir.Node, ir.Value] | None, bool]] = []
    for layer in _layers(g):
        w = array_of(layer.w_dq.inputs[0])
        assert w is not None
        k_in, n_out = (int(d) for d in w.shape)
        wanted = min(k_in, n_out) < min_int8_width if float_layers is None else layer.name in float_layers
        scale = layer.q.inputs[1]
        in_float = wanted and scale is not None and scale.is_initializer() and layer.matmul.name not in keep_int8
        plan.append((layer, _input_factor(layer, k_in) if in_float else None, in_float))
    chosen_float: list[str] = []
    float_weights: set[ir.Value] = set()
    u8_of_q: dict[ir.Node, tuple[ir.Value, ir.Value]] = {}
    for layer, fold, in_float in plan:
        if in_float:
            x = layer.q.inputs[0]
            assert x is not None
            nodes, weight = _float_layer(g, layer, x, fold, gemm=ranks.get(x.name or "") == 2)
            float_weights.add(weight)
            chosen_float.append(layer.name)
            replace_node(g, layer.nodes, nodes, {layer.out: nodes[-1].outputs[0]})
            continue
        # activation: Q(int8, zp 0) → Q(uint8, zp 128), shared by every layer reading it
        q = layer.q
        if q not in u8_of_q:
            qname = q.outputs[0].name
            zp = const(g, np.array(128, np.uint8), f"{qname}.u8_zero_point")
            u8: list[ir.Node] = []
            u8_of_q[q] = (op(u8, "QuantizeLinear", [q.inputs[0], q.inputs[1], zp], f"{qname}.u8",
                             name=f"{q.name}.u8"), zp)
            g.insert_before(q, u8)
        act, zp = u8_of_q[q]
        w_dq = layer.w_dq
        inputs = [act, w_dq.inputs[0], layer.a_dq.inputs[1], w_dq.inputs[1], zp,
                  w_dq.inputs[2] if len(w_dq.inputs) > 2 else None, *([layer.bias] if layer.add else [])]
        mitf: list[ir.Node] = []
        y = op(mitf, "MatMulIntegerToFloat", inputs, layer.out.name or "", name=layer.matmul.name or "",
               domain=MS_DOMAIN)
        replace_node(g, layer.nodes, mitf, {layer.out: y})
    drop_zero_adds(g)
    bypass_output_identities(g)
    remove_dead_code(g)
    if chosen_float:
        _move_weight_scales_into_float_layers(g, float_weights)
        remove_dead_code(g)
    if MS_DOMAIN not in model.opset_imports:
        model.opset_imports[MS_DOMAIN] = 1
    if chosen_float:
        model.metadata_props[CPU_FLOAT_LAYERS_KEY] = json.dumps(chosen_float)
        model.doc_string = ("edgeq INT8 policy specialized for ONNX Runtime CPU (the QDQ graph's arithmetic; these "
                            f"layers run in float on their int8 weights: {', '.join(chosen_float)})")
    else:
        model.doc_string = "edgeq INT8 policy specialized for ONNX Runtime CPU (same arithmetic as the QDQ graph)"
    return check(to_onnx(model, qdq))


def _input_factor(layer: _Layer, k_in: int) -> tuple[ir.Node, ir.Value] | None:
    """The ``Mul`` by a per-column constant (CrossQuant, equalization) that alone feeds the layer's quantizer."""
    x = layer.q.inputs[0]
    pre = _made_by(x, "Mul")
    if x is None or pre is None or len(x.uses()) != 1:
        return None
    factor = next((i for i in pre.inputs if i is not None and i.is_initializer() and i.const_value is not None
                   and list(i.const_value.shape) == [k_in]), None)
    return None if factor is None else (pre, factor)


def _float_layer(g: ir.Graph, layer: _Layer, x: ir.Value, fold: tuple[ir.Node, ir.Value] | None, *,
                 gemm: bool = True) -> tuple[list[ir.Node], ir.Value]:
    """``Gemm(x, Cast(W_int8) × w_scale [× column factors], bias)`` in place of an INT8 layer.

    With ``gemm=False`` (an input of rank 3, such as a Transformer's [batch, steps, features]),
    ``MatMul`` then ``Add`` of the bias: ``Gemm`` takes matrices only.

    ``x`` is the float tensor the layer's activation quantizer read. If that tensor is a ``Mul``
    by a per-column constant (CrossQuant's static column factors, an equalization scale) read by
    nothing else (``fold``), the factors move into the weight rows: (x · f) W = x (diag(f) W).
    Returns the nodes (the last writes the layer's result) and the float weight value.
    """
    base = layer.name
    w_dq = layer.w_dq
    w_int8, w_scale = w_dq.inputs[0], w_dq.inputs[1]
    zp = array_of(w_dq.inputs[2]) if len(w_dq.inputs) > 2 else None
    if zp is not None and np.any(zp != 0):
        raise ValueError(f"{w_dq.name}: edgeq weights are symmetric (zero point 0)")
    w = array_of(w_int8)
    assert w is not None and w_scale is not None
    k_in = int(w.shape[0])
    # A Gemm holds its weight as [N, K] (transB=1), as the float graph does: ONNX Runtime's batch-1
    # float GEMM is measurably faster in that layout than on a [K, N] weight; the int8 values are the
    # same, stored transposed (a MatMul keeps [K, N]).
    transposed = layer.add is not None and gemm
    if transposed:
        w_int8 = const(g, np.ascontiguousarray(w.T), f"{base}/w.int8_t")
        scale = array_of(w_scale)
        assert scale is not None
        scale = scale.astype(np.float32)
        w_scale = const(g, scale.reshape(-1, 1) if scale.ndim == 1 else scale, f"{base}/w.scale_t")
    nodes: list[ir.Node] = []
    w32 = op(nodes, "Cast", [w_int8], f"{base}/w.f32", name=f"{base}/w.cast", to=FLOAT)
    weight = op(nodes, "Mul", [w32, w_scale], f"{base}/w.dequantized", name=f"{base}/w.scale")
    if fold is not None:
        pre, factor = fold
        f = array_of(factor)
        assert f is not None
        rows = const(g, f.astype(np.float32).reshape((1, k_in) if transposed else (k_in, 1)), f"{base}/w.row_factors")
        weight = op(nodes, "Mul", [weight, rows], f"{base}/w.folded", name=f"{base}/w.fold_input_scale")
        x = pre.inputs[0] if pre.inputs[1] is factor else pre.inputs[1]  # type: ignore[assignment]
    out = layer.out.name or ""
    if transposed:
        op(nodes, "Gemm", [x, weight, layer.bias], out, name=base, transB=1)
    elif layer.add is not None:
        mm = op(nodes, "MatMul", [x, weight], f"{base}/matmul", name=base)
        op(nodes, "Add", [mm, layer.bias], out, name=f"{base}/bias")
    else:
        op(nodes, "MatMul", [x, weight], out, name=base)
    return nodes, weight


def _move_weight_scales_into_float_layers(g: ir.Graph, float_weights: set[ir.Value]) -> None:
    """Give an INT8 layer feeding only float layers a scalar weight scale (see the module docstring).

    ``float_weights``: the (load-time folded) weight values of the layers written in float.
    """
    columns: dict[ir.Node, ir.Value] = {}
    for mm in [n for n in g if n.op_type == "MatMulIntegerToFloat" and n.domain == MS_DOMAIN]:
        w_scale = array_of(mm.inputs[3])
        bias = array_of(mm.inputs[6]) if len(mm.inputs) > 6 else None
        if w_scale is None or w_scale.ndim != 1 or w_scale.size < 2 or np.any(w_scale <= 0):
            continue
        users = [u.node for u in mm.outputs[0].uses()]
        relu = users[0] if len(users) == 1 and users[0].op_type == "Relu" else None
        act = (relu or mm).outputs[0]
        readers = [u.node for u in act.uses()]
        if act.is_graph_output() or mm.outputs[0].is_graph_output() or not readers or not all(
                n.op_type in ("Gemm", "MatMul") and n.inputs[0] is act and n.inputs[1] in float_weights
                and act not in n.inputs[1:] for n in readers):
            continue
        base = mm.name or mm.outputs[0].name
        mm.replace_input_with(3, const(g, np.array(1.0, np.float32), f"{base}/unit_weight_scale"))
        factors = const(g, w_scale.astype(np.float32).reshape(-1, 1), f"{base}/weight_scale_rows")
        if bias is not None:
            mm.replace_input_with(6, const(g, (bias / w_scale).astype(np.float32), f"{base}/bias_over_weight_scale"))
        # the tensors now hold act / w_j per channel: rename them so nothing reads them as the originals
        renamed = f"{act.name}/over_weight_scale"
        if relu is not None:
            mm.outputs[0].name = f"{mm.outputs[0].name}/over_weight_scale"
        act.name = renamed
        for reader in dict.fromkeys(readers):
            rname = reader.name or reader.outputs[0].name
            use = factors
            if reader.attributes.get_int("transB") == 1:  # an [N, K] weight: the input's channels are its columns
                if mm not in columns:
                    columns[mm] = const(g, w_scale.astype(np.float32).reshape(1, -1), f"{base}/weight_scale_columns")
                use = columns[mm]
            nodes: list[ir.Node] = []
            scaled = op(nodes, "Mul", [reader.inputs[1], use], f"{rname}/w.rows_times_input_scale",
                        name=f"{rname}/w.absorb_input_scale")
            g.insert_before(reader, nodes)
            reader.replace_input_with(1, scaled)
