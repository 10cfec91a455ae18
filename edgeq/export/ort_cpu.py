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

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


#: Default ``min_int8_width``: layers with fewer inputs or outputs than this run in float on the CPU.
DEFAULT_CPU_FLOAT_BELOW = 32
CPU_FLOAT_LAYERS_KEY = "edgeq.cpu_float_layers"


def cpu_float_layers(model: onnx.ModelProto) -> list[str]:
    """The layers that a CPU-specialized file runs in float (from its metadata; [] if none)."""
    for prop in model.metadata_props:
        if prop.key == CPU_FLOAT_LAYERS_KEY:
            return [str(x) for x in json.loads(prop.value)]
    return []


def int8_layer_names(qdq: onnx.ModelProto) -> list[str]:
    """The INT8 MatMul layers of an edgeq QDQ graph (the ones :func:`specialize_for_ort_cpu` rewrites)."""
    producer = {o: n for n in qdq.graph.node for o in n.output}
    inits = {t.name: t for t in qdq.graph.initializer}
    names = []
    for node in qdq.graph.node:
        a_dq = producer.get(node.input[0]) if node.op_type == "MatMul" else None
        w_dq = producer.get(node.input[1]) if node.op_type == "MatMul" else None
        if a_dq is None or w_dq is None or a_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(a_dq.input[0])
        if (q is not None and q.op_type == "QuantizeLinear" and w_dq.input[0] in inits and q.input[1] in inits
                and inits[w_dq.input[0]].data_type == onnx.TensorProto.INT8):
            names.append(node.name or node.output[0])
    return names


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
    try:
        inferred = onnx.shape_inference.infer_shapes(qdq)
        ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*inferred.graph.value_info, *inferred.graph.input)
                 if v.type.tensor_type.HasField("shape")}
    except Exception:  # noqa: BLE001 - without shapes every layer is taken as 2-D, as before
        ranks = {}
    drop: set[int] = set()
    replace: dict[int, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    u8_of_q: dict[str, str] = {}
    chosen_float: list[str] = []
    float_weights: set[str] = set()
    for node in g.node:
        if node.op_type != "MatMul":
            continue
        a_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
        if a_dq is None or w_dq is None or a_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(a_dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or w_dq.input[0] not in inits:
            continue
        if inits[w_dq.input[0]].data_type != onnx.TensorProto.INT8:
            continue  # int4 weights (W4A8): edgeq.export.int4 writes those layers
        add = _bias_add(node, consumers, inits)
        k_in, n_out = (int(d) for d in inits[w_dq.input[0]].dims)
        wanted = (min(k_in, n_out) < min_int8_width if float_layers is None
                  else (node.name or node.output[0]) in float_layers)
        if wanted and q.input[1] in inits and node.name not in keep_int8:
            replace[id(node)] = _float_layer(node, q, w_dq, add, producer, consumers, inits, new_inits,
                                             gemm=ranks.get(q.input[0]) == 2)
            base = node.name or node.output[0]
            float_weights.add(next(n for n in replace[id(node)] if n.name == base).input[1])
            drop.update({id(a_dq), id(w_dq)} | ({id(add[0])} if add is not None else set()))
            chosen_float.append(node.name or node.output[0])
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
    nodes = _drop_zero_adds(nodes, inits, graph_outputs)
    nodes = _drop_dead_nodes(bypass_output_identities(nodes, graph_outputs), graph_outputs)
    if chosen_float:
        nodes = _move_weight_scales_into_float_layers(nodes, inits, new_inits, graph_outputs, float_weights)
    used = {i for n in nodes for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(kept + [t for t in new_inits if t.name in used])
    if not any(op.domain == MS_DOMAIN for op in m.opset_import):
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if chosen_float:
        helper.set_model_props(m, {**{p.key: p.value for p in m.metadata_props},
                                   CPU_FLOAT_LAYERS_KEY: json.dumps(chosen_float)})
        m.doc_string = ("edgeq INT8 policy specialized for ONNX Runtime CPU (the QDQ graph's arithmetic; these "
                        f"layers run in float on their int8 weights: {', '.join(chosen_float)})")
    else:
        m.doc_string = "edgeq INT8 policy specialized for ONNX Runtime CPU (same arithmetic as the QDQ graph)"
    onnx.checker.check_model(m)
    return m


def bypass_output_identities(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """Let the node feeding an ``Identity → graph output`` write the output itself (one kernel less).

    Shared by the ONNX Runtime CPU and CUDA specializations (:mod:`edgeq.export.ort_cuda`).
    """
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


def _bias_add(node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]],
              inits: dict[str, onnx.TensorProto]) -> tuple[onnx.NodeProto, str] | None:
    """The ``Add`` of a 1-D constant bias that alone consumes ``node``'s output, with the bias name."""
    users = consumers.get(node.output[0], [])
    if len(users) == 1 and users[0].op_type == "Add":
        cand = users[0]
        other = cand.input[1] if cand.input[0] == node.output[0] else cand.input[0]
        if other in inits and len(inits[other].dims) == 1:
            return cand, other
    return None


def _float_layer(node: onnx.NodeProto, q: onnx.NodeProto, w_dq: onnx.NodeProto,
                 add: tuple[onnx.NodeProto, str] | None, producer: dict[str, onnx.NodeProto],
                 consumers: dict[str, list[onnx.NodeProto]], inits: dict[str, onnx.TensorProto],
                 new_inits: list[onnx.TensorProto], *, gemm: bool = True) -> list[onnx.NodeProto]:
    """``Gemm(x, Cast(W_int8) × w_scale [× column factors], bias)`` in place of an INT8 layer.

    With ``gemm=False`` (an input of rank 3, such as a Transformer's [batch, steps, features]),
    ``MatMul`` then ``Add`` of the bias: ``Gemm`` takes matrices only.

    ``x`` is the float tensor the layer's activation quantizer read. If that tensor is a ``Mul``
    by a per-column constant (CrossQuant's static column factors, an equalization scale) read by
    nothing else, the factors move into the weight rows: (x · f) W = x (diag(f) W).
    """
    base = node.name or node.output[0]
    w_int8, w_scale = w_dq.input[0], w_dq.input[1]
    zp = w_dq.input[2] if len(w_dq.input) > 2 else ""
    if zp and np.any(numpy_helper.to_array(inits[zp]) != 0):
        raise ValueError(f"{w_dq.name}: edgeq weights are symmetric (zero point 0)")
    k_in = int(inits[w_int8].dims[0])
    x = q.input[0]
    # A Gemm holds its weight as [N, K] (transB=1), as the float graph does: ONNX Runtime's batch-1
    # float GEMM is measurably faster in that layout than on a [K, N] weight; the int8 values are the
    # same, stored transposed (a MatMul keeps [K, N]).
    transposed = add is not None and gemm
    if transposed:
        w_t = f"{base}/w.int8_t"
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[w_int8]).T), w_t))
        scale = numpy_helper.to_array(inits[w_scale]).astype(np.float32)
        new_inits.append(numpy_helper.from_array(scale.reshape(-1, 1) if scale.ndim == 1 else scale,
                                                 f"{base}/w.scale_t"))
        w_int8, w_scale = w_t, f"{base}/w.scale_t"
    nodes = [helper.make_node("Cast", [w_int8], [f"{base}/w.f32"], to=onnx.TensorProto.FLOAT, name=f"{base}/w.cast"),
             helper.make_node("Mul", [f"{base}/w.f32", w_scale], [f"{base}/w.dequantized"], name=f"{base}/w.scale")]
    weight = f"{base}/w.dequantized"
    pre = producer.get(x)
    if pre is not None and pre.op_type == "Mul" and len(consumers.get(x, [])) == 1:
        factor = next((i for i in pre.input if i in inits and list(inits[i].dims) == [k_in]), None)
        if factor is not None:
            f = numpy_helper.to_array(inits[factor]).astype(np.float32).reshape((1, k_in) if transposed else (k_in, 1))
            new_inits.append(numpy_helper.from_array(f, f"{base}/w.row_factors"))
            nodes.append(helper.make_node("Mul", [weight, f"{base}/w.row_factors"], [f"{base}/w.folded"],
                                          name=f"{base}/w.fold_input_scale"))
            weight = f"{base}/w.folded"
            x = pre.input[0] if pre.input[1] == factor else pre.input[1]
    if transposed:
        assert add is not None
        nodes.append(helper.make_node("Gemm", [x, weight, add[1]], [add[0].output[0]], name=base, transB=1))
    elif add is not None:
        nodes.append(helper.make_node("MatMul", [x, weight], [f"{base}/matmul"], name=base))
        nodes.append(helper.make_node("Add", [f"{base}/matmul", add[1]], [add[0].output[0]], name=f"{base}/bias"))
    else:
        nodes.append(helper.make_node("MatMul", [x, weight], [node.output[0]], name=base))
    return nodes


def _drop_zero_adds(nodes: list[onnx.NodeProto], inits: dict[str, onnx.TensorProto],
                    outputs: set[str]) -> list[onnx.NodeProto]:
    """Drop ``Add(x, 0)`` with a 1-D all-zero constant (the action rescale of a symmetric box, [-a, a]).

    ONNX Runtime removes such a no-op itself, except when it writes a graph output, which it does in
    this file once output Identities are bypassed; at batch 1 the kernel is ~0.2 µs. The producer of
    ``x`` then writes the Add's output (``x`` has no other reader), so names and results are unchanged.
    """
    out = list(nodes)
    for add in [n for n in out if n.op_type == "Add" and len(n.input) == 2]:
        const = [i for i in add.input if i in inits]
        if len(const) != 1 or len(inits[const[0]].dims) > 1:
            continue
        if np.any(numpy_helper.to_array(inits[const[0]]) != 0):
            continue
        x = add.input[1] if add.input[0] == const[0] else add.input[0]
        producer = next((n for n in out if x in n.output), None)
        readers = [n for n in out if x in n.input]
        if producer is None or readers != [add] or x in outputs:
            continue
        producer.output[list(producer.output).index(x)] = add.output[0]
        out.remove(add)
    return out


def _drop_dead_nodes(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """Remove nodes none of whose outputs is read (e.g. an activation quantizer of a float layer)."""
    out = list(nodes)
    while True:
        used = {i for n in out for i in n.input} | outputs
        keep = [n for n in out if any(o in used for o in n.output)]
        if len(keep) == len(out):
            return out
        out = keep


def _move_weight_scales_into_float_layers(nodes: list[onnx.NodeProto], inits: dict[str, onnx.TensorProto],
                                          new_inits: list[onnx.TensorProto], outputs: set[str],
                                          float_weights: set[str]) -> list[onnx.NodeProto]:
    """Give an INT8 layer feeding only float layers a scalar weight scale (see the module docstring).

    ``float_weights``: the (load-time folded) weight tensors of the layers written in float.
    """
    new_by_name = {t.name: t for t in new_inits}

    def const(name: str) -> np.ndarray | None:
        t = inits.get(name) or new_by_name.get(name)
        return None if t is None else numpy_helper.to_array(t)

    out = list(nodes)
    for mm in [n for n in out if n.op_type == "MatMulIntegerToFloat" and n.domain == MS_DOMAIN]:
        w_scale = const(mm.input[3])
        bias = const(mm.input[6]) if len(mm.input) > 6 and mm.input[6] else None
        if w_scale is None or w_scale.ndim != 1 or w_scale.size < 2 or np.any(w_scale <= 0):
            continue
        users = [n for n in out if mm.output[0] in n.input]
        relu = users[0] if len(users) == 1 and users[0].op_type == "Relu" else None
        act = relu.output[0] if relu is not None else mm.output[0]
        readers = [n for n in out if act in n.input]
        if act in outputs or mm.output[0] in outputs or not readers or not all(
                n.op_type in ("Gemm", "MatMul") and n.input[0] == act and n.input[1] in float_weights
                and act not in n.input[1:] for n in readers):
            continue
        base = mm.name or mm.output[0]
        one, factors = f"{base}/unit_weight_scale", f"{base}/weight_scale_rows"
        new_inits.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
        new_inits.append(numpy_helper.from_array(w_scale.astype(np.float32).reshape(-1, 1), factors))
        mm.input[3] = one
        if bias is not None:
            name = f"{base}/bias_over_weight_scale"
            new_inits.append(numpy_helper.from_array((bias / w_scale).astype(np.float32), name))
            mm.input[6] = name
        # the tensors now hold act / w_j per channel: rename them so nothing reads them as the originals
        renamed = f"{act}/over_weight_scale"
        if relu is not None:
            mid = f"{mm.output[0]}/over_weight_scale"
            mm.output[0] = mid
            relu.input[0], relu.output[0] = mid, renamed
        else:
            mm.output[0] = renamed
        for reader in readers:
            reader.input[0] = renamed
            scaled = f"{reader.name or reader.output[0]}/w.rows_times_input_scale"
            idx = out.index(reader)
            trans_b = any(a.name == "transB" and a.i == 1 for a in reader.attribute)
            use = factors
            if trans_b:  # an [N, K] weight: the input's channels are its columns
                use = f"{base}/weight_scale_columns"
                if use not in {t.name for t in new_inits}:
                    new_inits.append(numpy_helper.from_array(w_scale.astype(np.float32).reshape(1, -1), use))
            out.insert(idx, helper.make_node("Mul", [reader.input[1], use], [scaled],
                                             name=f"{reader.name or reader.output[0]}/w.absorb_input_scale"))
            reader.input[1] = scaled
    return out
