"""Static checker: does a QDQ ONNX graph obey the rules TensorRT's explicit quantization needs?

TensorRT builds an INT8 engine from a QDQ ONNX graph only if the graph follows a handful of rules
(symmetric int8, constant positive scales, float bias, per-channel weights on the right axis, ...);
breaking one either makes the ONNX parser reject the model, or silently leaves layers in float, or
adds reformat layers that cost more than int8 saves. :func:`check_qdq_model` finds every violation
that can be seen without building the engine, and :func:`format_report` prints them for a person.

The rules come from TensorRT's "explicit quantization" guide and the onnx-tensorrt operator notes
(summarised in ``shared/notes/tensorrt-qdq-rules.md``). Each :class:`Violation` names the rule, the
node at fault, what is wrong and how to fix it. ``error`` means TensorRT rejects the graph or the
result is wrong; ``warning`` means it builds but probably not as intended (slower, or less int8).

Only numpy and onnx are needed; the checker never imports TensorRT.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

__all__ = ["RULES", "Violation", "check_qdq_model", "format_report"]

ERROR = "error"
WARNING = "warning"

#: Every rule id the checker can report, with a one-line summary.
RULES: dict[str, str] = {
    "integer-op": "QLinear*/MatMulInteger/ConvInteger/QGemm ops: TensorRT imports QDQ form only",
    "dynamic-quantization": "DynamicQuantizeLinear & co compute int8 scales at run time",
    "contrib-qdq": "Q/DQ in the com.microsoft domain: TensorRT's parser knows only the ONNX domain",
    "opset": "opset too old for per-axis Q/DQ (13), fp16/bf16 scales (19) or int4/blocked (21)",
    "no-qdq": "the graph holds no Q/DQ node, so nothing will run in int8",
    "zero-point-nonzero": "a zero point is not 0: TensorRT is symmetric only",
    "zero-point-dtype": "a zero point (or the quantized type) is not int8 (uint8 is rejected)",
    "zero-point-not-constant": "a zero point is computed at run time",
    "scale-not-constant": "a scale is not an initializer/Constant (computed at run time)",
    "scale-invalid": "a scale is zero, negative, NaN or infinite",
    "scale-shape": "scale/zero-point shape is not a scalar or a 1-D tensor as long as the axis",
    "activation-per-channel": "an activation is quantized per channel: TensorRT wants per tensor",
    "int32-bias": "an int32 bias goes through DequantizeLinear into Gemm/Conv: keep bias float",
    "int32-dequant": "DequantizeLinear of an int32 tensor elsewhere in the graph",
    "per-channel-axis": "a weight's per-channel axis is not the consumer's output-channel axis",
    "weight-per-tensor": "a weight is quantized per tensor: per output channel keeps accuracy",
    "weight-not-narrow": "an int8 weight uses -128: keep weights in [-127, 127]",
    "one-input-quantized": "Gemm/MatMul/Conv has only one of data and weight quantized",
    "qdq-on-weighted-output": "Q/DQ on a Gemm/MatMul/Conv output that no int8 op consumes",
    "qdq-pair-mismatch": "a QuantizeLinear and its DequantizeLinear use different scales",
    "q-without-dq": "a QuantizeLinear output feeds something other than DequantizeLinear",
    "concat-scale-mismatch": "the quantized inputs of a Concat have different scales",
    "qdq-graph-output": "a graph output is produced by QuantizeLinear/DequantizeLinear",
    "bmm-one-input-quantized": "an activation×activation MatMul (attention BMM) has only one input quantized",
    "softmax-quantized-input": "a Softmax reads an int8 (Q/DQ) tensor: attention scores must stay float",
    "attention-scale-after-bmm1": "the attention scale multiplies Q·Kᵀ after BMM1 instead of Q or K before it",
    "layernorm-quantized-input": "a LayerNormalization reads an int8 (Q/DQ) tensor: normalization stays float",
    "layernorm-fp16": "a LayerNormalization computes in fp16 (overflow risk after attention): keep it fp32",
    "residual-add-quantized": "a transformer residual Add (feeding LayerNormalization) has a Q/DQ input",
    "int4-weight-only": "an INT4 weight's Gemm/MatMul also has a quantized (Q/DQ) activation: TensorRT runs INT4 "
                        "as weight-only quantization (activations float/fp16), W4A8 is not a TensorRT mode",
    "int4-activation": "an activation is quantized to INT4: TensorRT quantizes only weights to INT4",
    "int4-consumer": "an INT4 weight feeds something other than a Gemm/MatMul (weight-only INT4 is for GEMMs)",
    "block-not-int4": "block quantization (a block_size attribute / a 2-D scale) on a non-INT4 tensor",
    "block-rank": "a blocked Q/DQ on a tensor that is not 2-D (TensorRT blocks 2-D weights only)",
    "block-axis": "an INT4 weight is blocked along its output-channel axis instead of the reduction axis K",
}

_INTEGER_OPS = frozenset(
    {
        "QLinearMatMul",
        "QLinearConv",
        "MatMulInteger",
        "ConvInteger",
        "QGemm",
        "QLinearAdd",
        "QLinearMul",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearConcat",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearSoftmax",
        "QLinearReduceMean",
        "QLinearWhere",
        "QAttention",
    }
)
_DYNAMIC_OPS = frozenset(
    {"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM"}
)
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_WEIGHTED_OPS = frozenset({"Gemm", "MatMul", "Conv", "ConvTranspose"})
# Ops whose quantized input TensorRT fuses into an int8 kernel (rule 10: residual Add; rule 12: Concat).
_INT8_CONSUMERS = _WEIGHTED_OPS | {
    "Add",
    "Concat",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "QuantizeLinear",
}
# Shape-only ops that TensorRT propagates Q/DQ through.
_PASS_THROUGH = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"})
_DEFAULT_DOMAINS = ("", "ai.onnx")
_INT4_TYPES = (TensorProto.INT4, TensorProto.UINT4)


@dataclass(frozen=True)
class Violation:
    """One broken rule: what rule, which node, what is wrong, how to fix it, and how bad it is."""

    rule: str
    node: str
    message: str
    fix: str
    severity: str

    def __post_init__(self) -> None:
        if self.severity not in (ERROR, WARNING):
            raise ValueError(f"severity must be 'error' or 'warning', got {self.severity!r}")


@dataclass(frozen=True)
class _Const:
    dtype: int  # onnx TensorProto data type
    array: np.ndarray | None  # None where numpy cannot hold the type


class _Graph:
    """Indexes of one ONNX graph: constants, producers, consumers, inferred types and shapes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.nodes = list(graph.node)
        self.consts: dict[str, _Const] = {}
        for init in graph.initializer:
            self.consts[init.name] = _Const(init.data_type, _to_array(init))
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for i, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, i))
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output:
                const = _constant_node_value(node)
                if const is not None:
                    self.consts[node.output[0]] = const
        self.graph_outputs = {o.name for o in graph.output}
        self.elem_type: dict[str, int] = {}
        self.shape: dict[str, tuple[int | None, ...]] = {}
        for vi in _value_infos(model):
            tt = vi.type.tensor_type
            if tt.elem_type:
                self.elem_type[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shape[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        for name, const in self.consts.items():
            self.elem_type[name] = const.dtype
            if const.array is not None:
                self.shape[name] = tuple(int(d) for d in const.array.shape)
        self.opset = _default_opset(model)

    def name_of(self, node: onnx.NodeProto) -> str:
        """A node's name, or a stand-in built from its type and first output where it has none."""
        if node.name:
            return node.name
        out = node.output[0] if node.output else "?"
        return f"<{node.op_type} -> {out}>"

    def users(self, tensor: str) -> str:
        """The names of the nodes that read ``tensor``, for messages."""
        names = [self.name_of(n) for n, _ in self.consumers.get(tensor, [])]
        shown = ", ".join(repr(n) for n in names[:3])
        return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "") if names else "no node"

    def const(self, name: str) -> _Const | None:
        return self.consts.get(name)

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def input(self, node: onnx.NodeProto, i: int) -> str | None:
        """The name of input ``i`` of ``node``, or None if absent or empty (optional input omitted)."""
        if i < len(node.input) and node.input[i]:
            return str(node.input[i])
        return None

    def quant_elem_type(self, node: onnx.NodeProto) -> int | None:
        """The quantized (integer) element type a Q produces or a DQ consumes."""
        if node.op_type == "QuantizeLinear":
            zp = self.input(node, 2)
            if zp is not None and zp in self.elem_type:
                return self.elem_type[zp]
            out_dtype = _attr(node, "output_dtype")
            if isinstance(out_dtype, int) and out_dtype != 0:
                return out_dtype
            if zp is None:
                return TensorProto.UINT8  # ONNX default for QuantizeLinear without zero point
            return self.elem_type.get(node.output[0])
        x = self.input(node, 0)
        if x is None:
            return None
        if x in self.elem_type:
            return self.elem_type[x]
        prod = self.producer.get(x)
        if prod is not None and prod.op_type == "QuantizeLinear":
            return self.quant_elem_type(prod)
        zp = self.input(node, 2)
        return self.elem_type.get(zp) if zp is not None else None

    def dq_source(self, tensor: str) -> onnx.NodeProto | None:
        """The DequantizeLinear that produces ``tensor``, looking through shape-only ops."""
        seen = 0
        while tensor in self.producer and seen < 16:
            node = self.producer[tensor]
            if node.op_type == "DequantizeLinear":
                return node
            if node.op_type in _PASS_THROUGH and node.input:
                tensor = node.input[0]
                seen += 1
                continue
            return None
        return None

    def weight_root(self, dq: onnx.NodeProto) -> tuple[str, onnx.NodeProto | None] | None:
        """If ``dq`` dequantizes a constant weight, return (weight name, the Q node or None)."""
        x = self.input(dq, 0)
        if x is None:
            return None
        if self.is_const(x):
            return x, None
        prod = self.producer.get(x)
        if prod is not None and prod.op_type == "QuantizeLinear":
            px = self.input(prod, 0)
            if px is not None and self.is_const(px):
                return px, prod
        return None


def _to_array(t: onnx.TensorProto) -> np.ndarray | None:
    try:
        return np.asarray(numpy_helper.to_array(t))
    except Exception:  # noqa: BLE001 - exotic types (float4, ...) the checker only needs the dtype of
        return None


def _constant_node_value(node: onnx.NodeProto) -> _Const | None:
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return _Const(a.t.data_type, _to_array(a.t))
        if a.name == "value_float":
            return _Const(TensorProto.FLOAT, np.asarray(a.f, dtype=np.float32))
        if a.name == "value_floats":
            return _Const(TensorProto.FLOAT, np.asarray(list(a.floats), dtype=np.float32))
        if a.name == "value_int":
            return _Const(TensorProto.INT64, np.asarray(a.i, dtype=np.int64))
        if a.name == "value_ints":
            return _Const(TensorProto.INT64, np.asarray(list(a.ints), dtype=np.int64))
    return None


def _value_infos(model: onnx.ModelProto) -> Iterable[onnx.ValueInfoProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is a help, not a requirement
        inferred = model
    g = inferred.graph
    return [*g.input, *g.output, *g.value_info]


def _default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            return int(imp.version)
    return None


def _attr(node: onnx.NodeProto, name: str) -> object | None:
    for a in node.attribute:
        if a.name == name:
            value: object = onnx.helper.get_attribute_value(a)
            return value
    return None


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    value = _attr(node, name)
    return int(value) if isinstance(value, int) else default


def _dtype_name(dtype: int | None) -> str:
    if dtype is None:
        return "unknown"
    try:
        return str(TensorProto.DataType.Name(dtype)).lower()
    except ValueError:
        return str(dtype)


def _expected_weight_axis(consumer: onnx.NodeProto, index: int, rank: int) -> tuple[int, str] | None:
    """Per-output-channel axis of a weight used as input ``index`` of ``consumer`` (rule 8)."""
    op = consumer.op_type
    if op == "Gemm" and index == 1:
        if _int_attr(consumer, "transB", 0) == 1:
            return 0, "Gemm with transB=1 holds its weight as [N, K]: output channels are axis 0"
        return 1, "Gemm with transB=0 holds its weight as [K, N]: output channels are axis 1"
    if op == "MatMul" and index == 1:
        return rank - 1, f"a MatMul weight is [..., K, N]: output channels are the last axis ({rank - 1})"
    if op == "Conv" and index == 1:
        return 0, "a Conv weight is [M, C/group, k...]: output channels are axis 0"
    if op == "ConvTranspose" and index == 1:
        return 1, "a ConvTranspose weight is [C, M/group, k...]: output channels are axis 1"
    return None


def check_qdq_model(model: onnx.ModelProto | str | Path) -> list[Violation]:
    """Check a QDQ ONNX model against the TensorRT explicit-quantization rules that can be seen statically.

    Args:
        model: an ``onnx.ModelProto`` or the path of an ONNX file.

    Returns:
        Every violation found, errors first, then warnings, each in graph order. An empty list means
        the graph should import into TensorRT with the intended int8 regions.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    g = _Graph(model)
    out: list[Violation] = []

    seen: set[tuple[str, str, str]] = set()

    def add(rule: str, node: str, message: str, fix: str, severity: str = ERROR) -> None:
        # A shared scale/zero point (a Q and its DQ use the same initializer) is reported once.
        key = (rule, node, message)
        if key not in seen:
            seen.add(key)
            out.append(Violation(rule=rule, node=node, message=message, fix=fix, severity=severity))

    qdq_nodes = [n for n in g.nodes if n.op_type in _QDQ_OPS]
    _check_ops(g, add)
    _check_opset(g, qdq_nodes, add)
    for node in qdq_nodes:
        _check_scale_and_zero_point(g, node, add)
    _check_int32_dequant(g, add)
    _check_weights(g, add)
    _check_weighted_inputs(g, add)
    _check_outputs_of_weighted_ops(g, add)
    _check_pairs(g, add)
    _check_concat(g, add)
    _check_graph_outputs(g, add)
    _check_attention(g, add)
    _check_int4(g, add)
    if not qdq_nodes and not any(n.op_type in _INTEGER_OPS | _DYNAMIC_OPS for n in g.nodes):
        add(
            "no-qdq",
            model.graph.name or "<graph>",
            "the graph has no QuantizeLinear/DequantizeLinear node, so TensorRT builds no int8 layer",
            "quantize the model (edgeq quantize) before building an int8 engine, or build fp16",
            WARNING,
        )
    order = {ERROR: 0, WARNING: 1}
    return sorted(out, key=lambda v: order[v.severity])  # stable: graph order within a severity


class _AddFn(Protocol):
    """Records one violation (the ``add`` closure inside :func:`check_qdq_model`)."""

    def __call__(self, rule: str, node: str, message: str, fix: str, severity: str = ERROR) -> None: ...


def _check_ops(g: _Graph, add: _AddFn) -> None:
    for node in g.nodes:
        name = g.name_of(node)
        if node.op_type in _INTEGER_OPS:
            add(
                "integer-op",
                name,
                f"{node.op_type} is a QOperator-format integer op; TensorRT imports QDQ form only",
                "export in QDQ format (QuantizeLinear -> DequantizeLinear around float ops), e.g. "
                "quantize_static(..., quant_format=QuantFormat.QDQ)",
            )
        elif node.op_type in _DYNAMIC_OPS:
            add(
                "dynamic-quantization",
                name,
                f"{node.op_type} computes int8 scales at run time; TensorRT has no dynamic int8",
                "calibrate static per-tensor activation scales (quantize_static) and fold any "
                "per-token/column factors into the weights",
            )
        elif node.op_type in _QDQ_OPS and node.domain not in _DEFAULT_DOMAINS:
            add(
                "contrib-qdq",
                name,
                f"{node.op_type} is in domain {node.domain!r}; TensorRT's ONNX parser only imports the "
                "standard-domain QuantizeLinear/DequantizeLinear",
                "quantize without UseQDQContribOps (standard domain, int8 types)",
            )


def _check_opset(g: _Graph, qdq_nodes: Sequence[onnx.NodeProto], add: _AddFn) -> None:
    if not qdq_nodes or g.opset is None:
        return
    graph_name = g.model.graph.name or "<graph>"
    if g.opset < 13:
        add(
            "opset",
            graph_name,
            f"opset {g.opset} is older than 13: QuantizeLinear/DequantizeLinear have no per-axis `axis` "
            "attribute there",
            "export with opset 13 or newer (17 recommended)",
        )
    half_scales = []
    int4 = []
    for node in qdq_nodes:
        scale = g.input(node, 1)
        if scale is not None and g.elem_type.get(scale) in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            half_scales.append(g.name_of(node))
        if g.quant_elem_type(node) in (TensorProto.INT4, TensorProto.UINT4) or _attr(node, "block_size"):
            int4.append(g.name_of(node))
    if half_scales and g.opset < 19:
        add(
            "opset",
            half_scales[0],
            f"opset {g.opset} < 19 but {len(half_scales)} Q/DQ node(s) use fp16/bf16 scales (first: {half_scales[0]})",
            "export with opset 19 or newer, or store the scales as float32",
        )
    if int4 and g.opset < 21:
        add(
            "opset",
            int4[0],
            f"opset {g.opset} < 21 but {len(int4)} Q/DQ node(s) use int4 or blocked quantization",
            "export with opset 21 or newer",
        )


def _check_scale_and_zero_point(g: _Graph, node: onnx.NodeProto, add: _AddFn) -> None:
    name = g.name_of(node)
    x = g.input(node, 0)
    scale_name = g.input(node, 1)
    zp_name = g.input(node, 2)
    qtype = g.quant_elem_type(node)
    if node.op_type == "DequantizeLinear" and qtype == TensorProto.INT32:
        return  # reported by _check_int32_dequant
    # --- quantized type and zero point -------------------------------------------------------------
    if zp_name is None:
        if qtype == TensorProto.UINT8:
            add(
                "zero-point-dtype",
                name,
                f"{node.op_type} has no zero point, so its quantized type defaults to uint8; TensorRT needs int8",
                "add an int8 zero point of 0 (same shape as the scale)",
            )
    else:
        zp = g.const(zp_name)
        if zp is None:
            add(
                "zero-point-not-constant",
                zp_name,
                f"zero point {zp_name!r} (used by {g.users(zp_name)}) is computed at run time",
                "store the zero point as an int8 initializer holding 0",
            )
        else:
            if zp.dtype == TensorProto.UINT8:
                add(
                    "zero-point-dtype",
                    zp_name,
                    f"zero point {zp_name!r} (used by {g.users(zp_name)}) is uint8 (asymmetric uint8 "
                    "quantization); TensorRT rejects uint8 Q/DQ",
                    "quantize with activation_type=QInt8 and weight_type=QInt8 (signed, symmetric)",
                )
            elif zp.dtype not in (TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN):
                add(
                    "zero-point-dtype",
                    zp_name,
                    f"zero point {zp_name!r} (used by {g.users(zp_name)}) has type "
                    f"{_dtype_name(zp.dtype)}; TensorRT's int8 path needs int8",
                    "use int8 zero points (0) and int8 quantized tensors",
                )
            if zp.array is not None and zp.array.size and np.any(zp.array.astype(np.float64) != 0):
                values = np.unique(zp.array.astype(np.int64))
                shown = ", ".join(str(int(v)) for v in values[:4]) + (", ..." if values.size > 4 else "")
                add(
                    "zero-point-nonzero",
                    zp_name,
                    f"zero point {zp_name!r} (used by {g.users(zp_name)}) is not 0 ({shown}); "
                    "TensorRT supports symmetric quantization only",
                    "quantize symmetrically (ActivationSymmetric=True, WeightSymmetric=True) so every zero point is 0",
                )
    # --- scale -----------------------------------------------------------------------------------
    if scale_name is None:
        return
    scale = g.const(scale_name)
    if scale is None:
        prod = g.producer.get(scale_name)
        how = f" by {prod.op_type} node {g.name_of(prod)!r}" if prod is not None else " (a graph input)"
        add(
            "scale-not-constant",
            scale_name,
            f"scale {scale_name!r} (used by {g.users(scale_name)}) is computed at run time{how}; "
            "TensorRT needs build-time constant int8 scales",
            "calibrate a static scale and store it as an initializer (per-token/dynamic int8 cannot be "
            "expressed in TensorRT)",
        )
        return
    if scale.array is not None:
        arr = scale.array.astype(np.float64)
        bad = ~np.isfinite(arr) | (arr <= 0)
        if np.any(bad):
            first = arr[bad].ravel()[0]
            add(
                "scale-invalid",
                scale_name,
                f"scale {scale_name!r} (used by {g.users(scale_name)}) has {int(bad.sum())} of {arr.size} "
                f"entries that are zero, negative or not finite (first: {first!r})",
                "give dead channels (absmax 0) a small positive fallback scale, e.g. 1/127; never 0 or NaN",
            )
    # --- shapes ----------------------------------------------------------------------------------
    scale_shape = g.shape.get(scale_name)
    if scale_shape is None:
        return
    block_size = _int_attr(node, "block_size", 0)
    if len(scale_shape) > 1 and not block_size:
        add(
            "scale-shape",
            name,
            f"scale {scale_name!r} has shape {list(scale_shape)}; it must be a scalar (per tensor) or 1-D (per axis)",
            "store a scalar scale, or a 1-D scale as long as the quantized axis",
        )
        return
    if zp_name is not None:
        zp_shape = g.shape.get(zp_name)
        if zp_shape is not None and zp_shape != scale_shape:
            add(
                "scale-shape",
                name,
                f"zero point {zp_name!r} has shape {list(zp_shape)} but scale {scale_name!r} has "
                f"{list(scale_shape)}; they must match",
                "give the zero point the scale's shape",
            )
    if len(scale_shape) == 1 and x is not None and not block_size:
        x_shape = g.shape.get(x)
        length = scale_shape[0]
        if x_shape is not None and len(x_shape) > 0 and length is not None:
            axis = _int_attr(node, "axis", 1)
            if axis < 0:
                axis += len(x_shape)
            if not 0 <= axis < len(x_shape):
                add(
                    "scale-shape",
                    name,
                    f"axis {_int_attr(node, 'axis', 1)} is outside the rank {len(x_shape)} of {x!r}",
                    "set axis to the quantized (output-channel) axis",
                )
            elif length != 1 and x_shape[axis] is not None and x_shape[axis] != length:
                add(
                    "scale-shape",
                    name,
                    f"1-D scale {scale_name!r} has {length} entries but axis {axis} of {x!r} "
                    f"(shape {list(x_shape)}) has {x_shape[axis]}",
                    "make the scale as long as the quantized axis, or fix the axis attribute",
                )
        # Activations per tensor (rule 8).
        from_q = x in g.producer and g.producer[x].op_type == "QuantizeLinear"
        if length is not None and length > 1 and not _is_weight_qdq(g, node) and not from_q:
            add(
                "activation-per-channel",
                name,
                f"activation {x!r} is quantized per channel ({length} scales); TensorRT supports only "
                "per-tensor quantization of activations",
                "use a single (scalar) scale for activations; keep per-channel scales for weights",
            )


def _is_weight_qdq(g: _Graph, node: onnx.NodeProto) -> bool:
    x = g.input(node, 0)
    if x is None:
        return False
    if g.is_const(x):
        return True
    if node.op_type == "DequantizeLinear":
        return g.weight_root(node) is not None
    return False


def _check_int32_dequant(g: _Graph, add: _AddFn) -> None:
    for node in g.nodes:
        if node.op_type != "DequantizeLinear" or g.quant_elem_type(node) != TensorProto.INT32:
            continue
        bias_of = [
            c
            for c, i in g.consumers.get(node.output[0], [])
            if c.op_type in ("Gemm", "Conv", "ConvTranspose") and i == 2
        ]
        if bias_of:
            add(
                "int32-bias",
                g.name_of(node),
                f"int32 bias {node.input[0]!r} is dequantized into {bias_of[0].op_type} "
                f"{g.name_of(bias_of[0])!r}; TensorRT's parser rejects int32 DequantizeLinear",
                "keep the bias float (ONNX Runtime: extra_options={'QuantizeBias': False})",
            )
        else:
            add(
                "int32-dequant",
                g.name_of(node),
                f"DequantizeLinear of int32 tensor {node.input[0]!r}; TensorRT dequantizes int8 (and fp8/int4) only",
                "store the tensor as float, or quantize it to int8",
            )


def _check_weights(g: _Graph, add: _AddFn) -> None:
    """Per-channel axis, per-tensor weights and the narrow range, for every DQ of a constant weight."""
    reported_narrow: set[str] = set()
    for dq in g.nodes:
        if dq.op_type != "DequantizeLinear":
            continue
        root = g.weight_root(dq)
        if root is None:
            continue
        weight, q = root
        wconst = g.const(weight)
        # Narrow range (rule 3): int8 weight initializers must stay in [-127, 127].
        if (
            q is None
            and wconst is not None
            and wconst.dtype == TensorProto.INT8
            and wconst.array is not None
            and weight not in reported_narrow
            and np.any(wconst.array == -128)
        ):
            reported_narrow.add(weight)
            add(
                "weight-not-narrow",
                weight,
                f"int8 weight {weight!r} has {int(np.sum(wconst.array == -128))} entries at -128; "
                "TensorRT's int8 kernels expect the narrow range [-127, 127]",
                "clip weights to [-127, 127] when quantizing (symmetric narrow range)",
                WARNING,
            )
        w_shape = g.shape.get(weight)
        if w_shape is None:
            continue
        rank = len(w_shape)
        for consumer, index in g.consumers.get(dq.output[0], []):
            expected = _expected_weight_axis(consumer, index, rank)
            if expected is None:
                continue
            exp_axis, why = expected
            for qnode in (dq, q):
                if qnode is None:
                    continue
                scale_values = _const_values(g, g.input(qnode, 1))
                if scale_values is None:
                    continue  # a runtime scale: reported by scale-not-constant
                n_scales = int(scale_values.size)
                if n_scales == 1:
                    if qnode is dq and rank >= 2 and (w_shape[exp_axis] or 0) > 1:
                        add(
                            "weight-per-tensor",
                            g.name_of(dq),
                            f"weight {weight!r} of {consumer.op_type} {g.name_of(consumer)!r} has one scale "
                            f"for {w_shape[exp_axis]} output channels",
                            f"quantize weights per output channel (axis {exp_axis}; per_channel=True)",
                            WARNING,
                        )
                    continue
                axis = _int_attr(qnode, "axis", 1)
                if axis < 0:
                    axis += rank
                if _int_attr(qnode, "block_size", 0):
                    continue  # blocked (INT4): the axis is the reduction axis K, checked by _check_int4
                if axis != exp_axis:
                    add(
                        "per-channel-axis",
                        g.name_of(qnode),
                        f"weight {weight!r} is quantized along axis {axis}, but {why}; "
                        f"consumer {consumer.op_type} {g.name_of(consumer)!r}",
                        f"quantize {weight!r} along axis {exp_axis} (for ONNX Runtime: "
                        f"QDQOpTypePerChannelSupportToAxis={{'{consumer.op_type}': {exp_axis}}})",
                    )


def _check_weighted_inputs(g: _Graph, add: _AddFn) -> None:
    """Rule 9: quantize both data and weight of every int8 Gemm/MatMul/Conv."""
    for node in g.nodes:
        if node.op_type not in _WEIGHTED_OPS or len(node.input) < 2:
            continue
        if node.op_type == "MatMul" and not any(_is_weight(g, i) for i in node.input[:2]):
            continue  # two activations (attention): bmm-one-input-quantized
        data_q = g.dq_source(node.input[0]) is not None
        weight_dq = g.dq_source(node.input[1])
        weight_q = weight_dq is not None
        if weight_dq is not None and g.quant_elem_type(weight_dq) in _INT4_TYPES:
            continue  # INT4 weight-only is TensorRT's INT4 mode: rule int4-weight-only
        if data_q != weight_q:
            which, other = ("weight", "data (input 0)") if weight_q else ("data", "weight (input 1)")
            add(
                "one-input-quantized",
                g.name_of(node),
                f"{node.op_type} has its {which} quantized but not its {other}; TensorRT runs it in "
                "float with extra reformats",
                "quantize both inputs (Q/DQ on the activation, DQ on the weight) or neither",
                WARNING,
            )


def _check_outputs_of_weighted_ops(g: _Graph, add: _AddFn) -> None:
    """Rule 9/11: no Q/DQ on Gemm/MatMul/Conv outputs unless an int8 op consumes the result."""
    for q in g.nodes:
        if q.op_type != "QuantizeLinear" or not q.input:
            continue
        prod = g.producer.get(q.input[0])
        if prod is None or prod.op_type not in _WEIGHTED_OPS:
            continue
        float_consumers: list[str] = []
        for dq, _ in g.consumers.get(q.output[0], []):
            if dq.op_type != "DequantizeLinear":
                continue
            if dq.output[0] in g.graph_outputs:
                float_consumers.append("a graph output")
            for c, _i in g.consumers.get(dq.output[0], []):
                if c.op_type not in _INT8_CONSUMERS:
                    float_consumers.append(f"{c.op_type} {g.name_of(c)!r}")
        if float_consumers:
            add(
                "qdq-on-weighted-output",
                g.name_of(q),
                f"output of {prod.op_type} {g.name_of(prod)!r} is quantized but consumed by "
                f"{', '.join(float_consumers[:3])}; TensorRT folds activations itself and adds a reformat here",
                "do not quantize the outputs of Gemm/MatMul/Conv; put Q/DQ on the inputs of the next "
                "Gemm/MatMul/Conv instead (ONNX Runtime: OpTypesToExcludeOutputQuantization)",
                WARNING,
            )


def _check_pairs(g: _Graph, add: _AddFn) -> None:
    for q in g.nodes:
        if q.op_type != "QuantizeLinear" or not q.output:
            continue
        consumers = g.consumers.get(q.output[0], [])
        others = [c for c, _ in consumers if c.op_type != "DequantizeLinear"]
        if others or q.output[0] in g.graph_outputs:
            what = f"{others[0].op_type} {g.name_of(others[0])!r}" if others else "a graph output"
            add(
                "q-without-dq",
                g.name_of(q),
                f"QuantizeLinear output {q.output[0]!r} feeds {what}, not a DequantizeLinear",
                "follow every QuantizeLinear by a DequantizeLinear (QDQ pairs)",
                WARNING,
            )
        q_scale = _const_values(g, g.input(q, 1))
        for dq, _ in consumers:
            if dq.op_type != "DequantizeLinear":
                continue
            dq_scale = _const_values(g, g.input(dq, 1))
            if q_scale is None or dq_scale is None:
                continue
            if q_scale.shape != dq_scale.shape or not np.allclose(q_scale, dq_scale, rtol=1e-6, atol=0):
                add(
                    "qdq-pair-mismatch",
                    g.name_of(dq),
                    f"DequantizeLinear uses scale {g.input(dq, 1)!r} but its QuantizeLinear "
                    f"{g.name_of(q)!r} uses {g.input(q, 1)!r} with other values",
                    "use the same scale (and zero point) in both halves of a Q/DQ pair",
                    WARNING,
                )


def _const_values(g: _Graph, name: str | None) -> np.ndarray | None:
    if name is None:
        return None
    c = g.const(name)
    return None if c is None or c.array is None else c.array.astype(np.float64)


def _check_concat(g: _Graph, add: _AddFn) -> None:
    """Rule 12: the quantized inputs of a Concat should share one scale."""
    for node in g.nodes:
        if node.op_type != "Concat":
            continue
        scales: list[tuple[str, np.ndarray]] = []
        for inp in node.input:
            dq = g.dq_source(inp) if inp else None
            if dq is None:
                continue
            values = _const_values(g, g.input(dq, 1))
            if values is not None:
                scales.append((inp, values))
        if len(scales) < 2:
            continue
        first_name, first = scales[0]
        for name, values in scales[1:]:
            if values.shape != first.shape or not np.allclose(values, first, rtol=1e-6, atol=0):
                add(
                    "concat-scale-mismatch",
                    g.name_of(node),
                    f"Concat inputs {first_name!r} and {name!r} are quantized with different scales; "
                    "TensorRT must requantize one of them",
                    "give all quantized inputs of a Concat the same scale (e.g. the max over the inputs)",
                    WARNING,
                )
                break


def _check_graph_outputs(g: _Graph, add: _AddFn) -> None:
    for out in g.model.graph.output:
        prod = g.producer.get(out.name)
        if prod is not None and prod.op_type in _QDQ_OPS:
            add(
                "qdq-graph-output",
                g.name_of(prod),
                f"graph output {out.name!r} is produced by {prod.op_type}; the policy's actions go "
                "through an extra (de)quantization and lose precision",
                "leave the last layer's output in float: no Q/DQ after the final Gemm/Tanh",
                WARNING,
            )


def format_report(violations: Iterable[Violation]) -> str:
    """Render violations as a human-readable report: one block per violation, then a summary line."""
    items = list(violations)
    if not items:
        return "TensorRT QDQ check: OK (no rule violated)"
    lines = []
    for v in items:
        lines.append(f"{v.severity.upper():7} [{v.rule}] {v.node}: {v.message}")
        lines.append(f"        fix: {v.fix}")
    n_err = sum(1 for v in items if v.severity == ERROR)
    n_warn = len(items) - n_err
    verdict = "TensorRT will reject or mis-build this graph" if n_err else "builds, but see the warnings"
    lines.append(f"TensorRT QDQ check: {n_err} error(s), {n_warn} warning(s): {verdict}")
    return "\n".join(lines)


def _is_weight(g: _Graph, tensor: str) -> bool:
    """A constant, or the dequantized form of one (a weight)."""
    if g.is_const(tensor):
        return True
    dq = g.dq_source(tensor)
    return dq is not None and g.weight_root(dq) is not None


def _check_attention(g: _Graph, add: _AddFn) -> None:
    """Attention and normalization placement (TensorRT's fused-attention and explicit-quantization notes).

    * MHA fusion in int8 needs Q/DQ on **both** inputs of each BMM (Q·Kᵀ and attention·V);
    * Softmax runs in float: its input (the BMM1 output) carries no Q/DQ;
    * the attention scale is applied to Q (or K) before BMM1, not to the scores after it;
    * LayerNormalization stays float (no Q/DQ on its input) and in fp32 (TensorRT warns that LayerNorm
      after attention in fp16 may overflow);
    * transformer residual Adds stay float (Model Optimizer quantizes residual Add inputs only
      where the Add fuses into a convolution).
    """
    for node in g.nodes:
        if node.op_type == "MatMul" and len(node.input) == 2 and not any(_is_weight(g, i) for i in node.input):
            quantized = [g.dq_source(i) is not None for i in node.input]
            if any(quantized) and not all(quantized):
                which = "first" if quantized[0] else "second"
                add("bmm-one-input-quantized", g.name_of(node),
                    f"MatMul of two activations has only its {which} input quantized; TensorRT runs it in float "
                    "(and cannot fuse the attention in int8)",
                    "quantize both inputs per tensor (Q/DQ on Q and Kᵀ for BMM1, on the Softmax output and V for "
                    "BMM2), or neither", WARNING)
        if node.op_type == "Softmax" and node.input:
            direct = g.dq_source(node.input[0])
            if direct is not None:
                add("softmax-quantized-input", g.name_of(node),
                    "Softmax reads a DequantizeLinear output: the attention scores were rounded to int8 before the "
                    "exponent; TensorRT computes Softmax in float",
                    "do not quantize the output of BMM1 (Q·Kᵀ); quantize the Softmax output (input of BMM2) instead",
                    WARNING)
            bmm = g.producer.get(node.input[0])
            scaled = None
            while bmm is not None and bmm.op_type in ("Add", "Mul", "Div", "Where", "Cast"):
                if bmm.op_type in ("Mul", "Div") and any(g.is_const(i) for i in bmm.input):
                    scaled = bmm
                nxt = [p for i in bmm.input if i and not g.is_const(i) if (p := g.producer.get(i)) is not None]
                bmm = next((p for p in nxt if p.op_type == "MatMul"), nxt[0] if nxt else None)
            if scaled is not None and bmm is not None and bmm.op_type == "MatMul":
                add("attention-scale-after-bmm1", g.name_of(scaled),
                    f"the attention scale ({scaled.op_type} {g.name_of(scaled)!r}) is applied to the scores after "
                    f"BMM1 {g.name_of(bmm)!r}; TensorRT's attention fusion needs Q or K scaled before BMM1",
                    "multiply Q (or K) by the scale before the MatMul (exact; edgeq's ingest moves it there)",
                    WARNING)
        if node.op_type == "LayerNormalization" and node.input:
            if g.dq_source(node.input[0]) is not None:
                add("layernorm-quantized-input", g.name_of(node),
                    "LayerNormalization reads a DequantizeLinear output; the normalization statistics are computed "
                    "on int8-rounded values", "leave LayerNormalization's input in float (no Q/DQ before it)",
                    WARNING)
            if g.elem_type.get(node.input[0]) == TensorProto.FLOAT16 or (
                    (p := g.producer.get(node.input[0])) is not None and p.op_type == "Cast"
                    and _int_attr(p, "to", 0) == TensorProto.FLOAT16):
                add("layernorm-fp16", g.name_of(node),
                    "LayerNormalization computes in fp16; TensorRT warns that LayerNorm after self-attention in "
                    "fp16 may overflow", "keep LayerNormalization in fp32 (no Cast to fp16 before it)", WARNING)
        if node.op_type == "Add" and len(node.input) == 2 and not any(g.is_const(i) for i in node.input):
            feeds_ln = any(c.op_type == "LayerNormalization" for c, _ in g.consumers.get(node.output[0], []))
            if feeds_ln and any(g.dq_source(i) is not None for i in node.input):
                add("residual-add-quantized", g.name_of(node),
                    "a residual Add that feeds LayerNormalization reads an int8 (Q/DQ) input; the residual stream "
                    "is rounded to int8", "leave transformer residual Adds in float (Q/DQ only on BMM and "
                    "Gemm/MatMul inputs)", WARNING)


def _check_int4(g: _Graph, add: _AddFn) -> None:
    """INT4 and block quantization (docs/tensorrt-int4-rules.md).

    TensorRT quantizes activations and weights for INT8 (FP8, FP4) but supports INT4 only as
    weight-only quantization; its Dequantize layer takes a 2-D scale (block quantization) for INT4
    only. So an INT4 DequantizeLinear must read a constant 2-D weight and feed a Gemm/MatMul whose
    activation input is float (no Q/DQ), and a blocked Q/DQ must be INT4.
    """
    for node in g.nodes:
        if node.op_type not in _QDQ_OPS:
            continue
        name = g.name_of(node)
        qtype = g.quant_elem_type(node)
        block = _int_attr(node, "block_size", 0)
        scale = g.input(node, 1)
        scale_shape = g.shape.get(scale) if scale is not None else None
        blocked = bool(block) or (scale_shape is not None and len(scale_shape) >= 2)
        if blocked and qtype not in _INT4_TYPES:
            add("block-not-int4", name,
                f"{node.op_type} {name!r} uses block quantization on a {_dtype_name(qtype)} tensor; TensorRT "
                "supports block quantization for INT4 only",
                "quantize this tensor per tensor / per channel, or make it an INT4 weight")
        if qtype not in _INT4_TYPES:
            continue
        if node.op_type == "QuantizeLinear" or g.weight_root(node) is None:
            if node.op_type == "QuantizeLinear" and g.input(node, 0) is not None and g.is_const(str(g.input(node, 0))):
                continue  # a float weight quantized to INT4 at build: its DequantizeLinear is checked below
            add("int4-activation", name,
                f"{node.op_type} {name!r} quantizes a computed tensor to INT4; TensorRT supports INT4 only for "
                "weights (weight-only quantization)",
                "keep activations float/fp16 next to INT4 weights, or quantize them to INT8 with INT8 weights")
            continue
        x = g.input(node, 0)
        x_shape = g.shape.get(x) if x is not None else None
        if blocked and x_shape is not None and len(x_shape) != 2:
            add("block-rank", name,
                f"blocked {node.op_type} {name!r} reads a {len(x_shape)}-D tensor; TensorRT block-quantizes "
                "2-D weights only",
                "block-quantize 2-D GEMM weights only (reshape the weight to [K, N] first)")
        for consumer, index in g.consumers.get(node.output[0], []):
            if consumer.op_type not in ("Gemm", "MatMul") or index != 1:
                add("int4-consumer", name,
                    f"INT4 weight {x!r} feeds {consumer.op_type} {g.name_of(consumer)!r} (input {index}); "
                    "TensorRT's INT4 weight-only quantization is for the weight (B) input of a GEMM",
                    "keep this weight INT8 or float")
                continue
            if block and x_shape is not None and len(x_shape) == 2:
                trans_b = consumer.op_type == "Gemm" and _int_attr(consumer, "transB", 0)
                k_axis = 1 if trans_b else 0
                axis = _int_attr(node, "axis", 1) % 2
                if axis != k_axis:
                    add("block-axis", name,
                        f"INT4 weight {x!r} of {consumer.op_type} {g.name_of(consumer)!r} is blocked along axis "
                        f"{axis}, its output channels; blocks run along the reduction axis K (axis {k_axis})",
                        f"block the weight along axis {k_axis} (one scale per block of K per output channel)",
                        WARNING)
            data = g.input(consumer, 0)
            if data is not None and g.dq_source(data) is not None:
                add("int4-weight-only", g.name_of(consumer),
                    f"{consumer.op_type} {g.name_of(consumer)!r} has an INT4 weight ({x!r}) and a quantized "
                    "(Q/DQ) activation: TensorRT supports INT4 as weight-only quantization, so this W4A8 layer "
                    "does not build as written",
                    "ship the weight-only form for TensorRT (edgeq.export.int4.weight_only: the activation "
                    "Q/DQ removed, fp16/fp32 GEMM on dequantized INT4 weights), or INT8 weights for W8A8")
