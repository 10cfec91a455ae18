"""Int4 layers of a plan (W4A8) as ONNX: the portable QDQ form, the ONNX Runtime CPU form, TensorRT's weight-only form.

**Portable QDQ (opset 21).** An int4 layer (``precision: int4`` in the plan) becomes
``Q(x, s_x) → DQ → MatMul(·, DQ(W4)) [→ Add(bias)]``: its input is quantized per tensor to int8 exactly
as an int8 layer's (the same Q/DQ pair, shared with other layers reading that tensor), and its weight is
an **INT4 initializer** (``[K, N]``, two values per byte) dequantized per output channel (``axis=1``) or in
blocks of ``block_size`` along K (``axis=0, block_size=B``, scale ``[ceil(K/B), N]``), zero point 0. INT4
and blocked DequantizeLinear need opset 21 and IR version 10; the model is raised to both.
:func:`lower_int4_layers` composes with :func:`edgeq.export.qdq.apply_plan`: it rewrites the float nodes
that ``apply_plan`` left for the int4 layers.

**ONNX Runtime CPU (measured on ORT 1.32, ``benchmarks/results/low_bit.md``).** ORT's CPU provider fuses
``DQ(int4 W) → MatMul`` into its int4 kernel ``MatMulNBits`` (com.microsoft) only when the MatMul's other
input is a plain float tensor; with W4A8's activation Q/DQ in front it fuses nothing and runs the int4
DequantizeLinear **on every call** (a 256x256 layer: ~20 µs fused vs ~350-450 µs unfused at batch 1).
:func:`specialize_int4_for_ort_cpu` therefore writes ``MatMulNBits`` directly, keeping the activation's
Q→DQ in front of it, so the CPU file computes the portable file's arithmetic: activations rounded to the
same int8 grid, int4 weights. ``accuracy_level=0`` (the default here) dequantizes the int4 weights inside
the kernel and accumulates in fp32: **int4 storage and an int4-weight kernel, fp32 arithmetic**, not
integer compute. ``accuracy_level=4`` lets the kernel quantize its (already int8-grid) input again,
per block of K, to int8 and run an integer dot product (ORT's own choice when it fuses a weight-only file).

**TensorRT** runs INT4 weights only as *weight-only* quantization: an INT4 ``DequantizeLinear`` on a
constant weight feeding a ``MatMul``/``Gemm`` whose activation stays float/fp16 (no Q/DQ); W4A8 is not a
TensorRT mode (``edgeq check`` rule ``int4-weight-only``, ``docs/tensorrt-int4-rules.md``).
:func:`weight_only` writes that form from a W4A8 file by dropping the int4 layers' activation Q/DQ.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.quantizers.int4 import Int4Weight, pack_int4, unpack_int4
from edgeq.quantizers.plan import LayerQuant, QuantPlan

__all__ = ["INT4_OPSET", "INT4_IR_VERSION", "int4_tensor", "int4_layer_names", "lower_int4_layers",
           "specialize_int4_for_ort_cpu", "tensor_int4_values", "weight_only"]

INT4_OPSET = 21
INT4_IR_VERSION = 10
MS_DOMAIN = "com.microsoft"
#: ``MatMulNBits`` block lengths ONNX Runtime's CPU kernels (MLAS) implement.
NBITS_BLOCKS = (16, 32, 64, 128, 256)


def int4_tensor(values: np.ndarray, name: str) -> onnx.TensorProto:
    """An ONNX INT4 initializer of ``values`` (ints in ``[-8, 7]``)."""
    t = onnx.TensorProto()
    t.name = name
    t.data_type = TensorProto.INT4
    t.dims.extend(int(d) for d in values.shape)
    t.raw_data = pack_int4(values)
    return t


def tensor_int4_values(t: onnx.TensorProto) -> np.ndarray:
    """The int8 values of an INT4 initializer (raw or ``int32_data`` storage)."""
    if t.data_type != TensorProto.INT4:
        raise ValueError(f"{t.name}: not an INT4 tensor (data_type {t.data_type})")
    count = int(np.prod(t.dims, dtype=np.int64))
    if t.raw_data:
        return unpack_int4(t.raw_data, count).reshape(tuple(t.dims))
    return np.asarray(numpy_helper.to_array(t), np.int8).reshape(tuple(t.dims))


def raise_opset(m: onnx.ModelProto, opset: int = INT4_OPSET) -> None:
    """Raise the default-domain opset to at least ``opset`` and the IR version to at least 10."""
    for op in m.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < opset:
            op.version = opset
    m.ir_version = max(m.ir_version, INT4_IR_VERSION)


def _kn(w4: Int4Weight) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The weight as ``[K, N]`` int4 values, its DequantizeLinear scale and attributes."""
    q_oi, s_ob = w4.out_in()
    if w4.block_size == 0:
        return np.ascontiguousarray(q_oi.T), np.ascontiguousarray(s_ob[:, 0]), {"axis": 1}
    return np.ascontiguousarray(q_oi.T), np.ascontiguousarray(s_ob.T), {"axis": 0, "block_size": w4.block_size}


def lower_int4_layers(m: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """Rewrite, in place, the float nodes of ``plan``'s int4 layers into W4A8 QDQ; returns ``m``.

    ``m`` is :func:`edgeq.export.qdq.apply_plan`'s graph (input scalings applied, the int4 layers'
    nodes still float). Each int4 layer's input gets the per-tensor int8 Q/DQ pair of
    ``plan.activations`` (reused when an int8 layer already made it); bias stays float.
    """
    layers = {la.node: la for la in plan.int4_layers()}
    if not layers:
        return m
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    outputs = {o for n in g.node for o in n.output}
    new_inits: list[onnx.TensorProto] = []
    removed: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    made_dq: set[str] = set()

    def add(array: np.ndarray, name: str) -> str:
        new_inits.append(numpy_helper.from_array(array, name))
        return name

    def dq_of(x: str) -> list[onnx.NodeProto]:
        base = x.replace("/", "_")
        dq = f"{base}.dq"
        if dq in outputs or dq in made_dq:
            return []
        act = plan.activations[x]
        scale = add(np.array(act.scale, np.float32), f"{base}.act_scale")
        zp = add(np.array(0, np.int8), f"{base}.act_zero_point")
        made_dq.add(dq)
        return [helper.make_node("QuantizeLinear", [x, scale, zp], [f"{base}.q"], name=f"{base}/QuantizeLinear"),
                helper.make_node("DequantizeLinear", [f"{base}.q", scale, zp], [dq], name=f"{base}/DequantizeLinear")]

    for node in g.node:
        layer = layers.get(node.name)
        if layer is None:
            nodes.append(node)
            continue
        nodes.extend(_int4_nodes(node, layer, inits, consumers, dq_of, new_inits, removed, add))
    del g.node[:]
    g.node.extend(nodes)
    kept = [t for t in g.initializer if t.name not in removed]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    raise_opset(m)
    return m


def _int4_nodes(node: onnx.NodeProto, layer: LayerQuant, inits: dict[str, onnx.TensorProto],
                consumers: dict[str, int], dq_of: Callable[[str], list[onnx.NodeProto]],
                new_inits: list[onnx.TensorProto], removed: set[str],
                add: Callable[[np.ndarray, str], str]) -> list[onnx.NodeProto]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm" and (attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
                                   or attrs.get("transA", 0)):
        raise ValueError(f"layer {node.name}: int4 export supports Gemm with alpha=beta=1, transA=0")
    w4 = layer.weight4
    assert w4 is not None
    x = layer.input
    out = list(dq_of(x))
    base = x.replace("/", "_")
    q_kn, scale, dq_attrs = _kn(w4)
    wname = layer.weight_name
    new_inits.append(int4_tensor(q_kn, f"{wname}.int4"))
    s_name = add(scale.astype(np.float32), f"{wname}.int4_scale")
    zp = int4_tensor(np.zeros(scale.shape, np.int8), f"{wname}.int4_zero_point")
    new_inits.append(zp)
    w_dq = f"{wname}.int4_dq"
    dq = helper.make_node("DequantizeLinear", [f"{wname}.int4", s_name, zp.name], [w_dq],
                          name=f"{wname}/DequantizeLinear")
    dq.attribute.extend(helper.make_attribute(k, v) for k, v in dq_attrs.items())
    out.append(dq)
    if consumers.get(wname, 0) == 1 and wname in inits:
        removed.add(wname)
    bias: str | None = None
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = node.input[2]
        if layer.bias is not None:
            if consumers.get(bias, 0) == 1:
                removed.add(bias)
            bias = add(np.asarray(layer.bias, np.float32).reshape(-1), f"{bias}.int4_corrected")
    elif layer.bias is not None:  # a MatMul without bias whose correction is a new bias
        bias = add(np.asarray(layer.bias, np.float32).reshape(-1), f"{wname}.int4_bias")
    y = node.output[0]
    mm_out = f"{y}.matmul" if bias else y
    out.append(helper.make_node("MatMul", [f"{base}.dq", w_dq], [mm_out], name=node.name))
    if bias:
        out.append(helper.make_node("Add", [mm_out, bias], [y], name=f"{node.name}/bias"))
    return out


def _int4_dq_matmuls(m: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """``(weight DequantizeLinear, MatMul)`` pairs whose weight is a constant INT4 initializer."""
    inits = {t.name: t for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    pairs = []
    for node in m.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        t = inits.get(dq.input[0])
        if t is not None and t.data_type in (TensorProto.INT4, TensorProto.UINT4):
            pairs.append((dq, node))
    return pairs


def int4_layer_names(m: onnx.ModelProto) -> list[str]:
    """The MatMul/Gemm nodes of ``m`` that read an INT4 weight (through DequantizeLinear)."""
    return [mm.name or mm.output[0] for _, mm in _int4_dq_matmuls(m)]


def _nbits_block(k: int, block_size: int) -> int:
    if block_size:
        if block_size not in NBITS_BLOCKS:
            raise ValueError(f"MatMulNBits needs a block of {NBITS_BLOCKS}, got {block_size}")
        return block_size
    for b in NBITS_BLOCKS:  # per channel: one block covering K (or 256-blocks sharing the channel's scale)
        if b >= k:
            return b
    return NBITS_BLOCKS[-1]


def specialize_int4_for_ort_cpu(m: onnx.ModelProto, *, accuracy_level: int = 0) -> onnx.ModelProto:
    """A copy of ``m`` with every ``DQ(INT4 W) → MatMul`` written as ONNX Runtime's ``MatMulNBits``.

    The MatMul's first input (the activation's Q→DQ output in a W4A8 file) is kept, so the arithmetic
    is the portable file's. Per-channel weights become blocks of the smallest supported length
    covering K (or 256-blocks repeating the channel's scale): the same values. ``accuracy_level``:
    0 = fp32 accumulation of in-kernel dequantized weights; 4 = int8 dot products on a per-block
    re-quantization of the input (see the module docstring).
    """
    out = onnx.ModelProto()
    out.CopyFrom(m)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    pairs = _int4_dq_matmuls(out)
    if not pairs:
        return out
    consumers: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    replace: dict[int, onnx.NodeProto] = {}
    drop: set[int] = set()
    removed: set[str] = set()
    new_inits: list[onnx.TensorProto] = []
    index = {id(n): i for i, n in enumerate(g.node)}
    for dq, mm in pairs:
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        q = tensor_int4_values(inits[dq.input[0]]).astype(np.int16)  # [K, N]
        s = np.asarray(numpy_helper.to_array(inits[dq.input[1]]), np.float32)
        if mm.op_type != "MatMul" or q.ndim != 2 or (len(dq.input) > 2 and dq.input[2] and
                                                     np.any(tensor_int4_values(inits[dq.input[2]]))):
            continue
        k, n = q.shape
        bsz = int(attrs.get("block_size", 0))
        blk = _nbits_block(k, bsz)
        nb = -(-k // blk)
        if bsz:
            s_nb = s.T  # [N, ceil(K/B)]
        else:
            s_nb = np.repeat(s.reshape(n, 1), nb, axis=1)
        codes = np.full((n, nb * blk), 8, np.uint8)  # zero point 8: code 8 is 0 (pads K)
        codes[:, :k] = (q.T + 8).astype(np.uint8)
        c = codes.reshape(n, nb, blk)
        packed = (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)
        base = (mm.name or mm.output[0]).replace("/", "_")
        b_name, s_name = f"{base}.nbits_B", f"{base}.nbits_scales"
        new_inits.append(numpy_helper.from_array(packed, b_name))
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(s_nb.reshape(-1), np.float32), s_name))
        replace[index[id(mm)]] = helper.make_node(
            "MatMulNBits", [mm.input[0], b_name, s_name], list(mm.output), name=mm.name, domain=MS_DOMAIN,
            K=int(k), N=int(n), bits=4, block_size=int(blk), accuracy_level=int(accuracy_level))
        if consumers.get(dq.output[0], 0) == 1:
            drop.add(index[id(dq)])
            for name in dq.input:
                if name and consumers.get(name, 0) == 1:
                    removed.add(name)
    nodes = [replace.get(i, node) for i, node in enumerate(g.node) if i not in drop]
    del g.node[:]
    g.node.extend(nodes)
    kept = [t for t in g.initializer if t.name not in removed]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    if not any(op.domain == MS_DOMAIN for op in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out


def weight_only(m: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a W4A8 file in TensorRT's INT4 weight-only form: the int4 layers' activation Q/DQ removed.

    The MatMul reads the float tensor the Q/DQ pair was fed with (the pair stays for int8 layers
    that share it).
    """
    out = onnx.ModelProto()
    out.CopyFrom(m)
    producer = {o: n for n in out.graph.node for o in n.output}
    for _, mm in _int4_dq_matmuls(out):
        dq = producer.get(mm.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            mm.input[0] = q.input[0]
    used = {i for n in out.graph.node for i in n.input} | {o.name for o in out.graph.output}
    changed = True
    while changed:  # drop Q/DQ pairs nothing reads any more
        changed = False
        keep = []
        for n in out.graph.node:
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in used for o in n.output):
                changed = True
                continue
            keep.append(n)
        if changed:
            del out.graph.node[:]
            out.graph.node.extend(keep)
            used = {i for n in out.graph.node for i in n.input} | {o.name for o in out.graph.output}
    names = {i for n in out.graph.node for i in n.input}
    kept = [t for t in out.graph.initializer if t.name in names]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out
