"""Read-only questions about a float policy graph: which layers carry weights that INT8 can take."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass(frozen=True)
class WeightedLayer:
    """A Gemm/MatMul whose second input is a constant weight matrix.

    ``weight_axis`` is the output-channel axis of the stored weight (Gemm ``transB=1``: 0,
    ``transB=0`` and MatMul [K, N]: 1), the axis of its per-channel scale.
    """

    node: str
    op_type: str
    input: str
    weight: str
    bias: str | None
    weight_axis: int
    in_features: int
    out_features: int


def initializer_map(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def constant_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of an initializer or a ``Constant`` node output, else None."""
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    return None


def _constant_index(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Name → tensor of every constant :func:`constant_value` would find (the first of a name wins, as there),
    built once so that a question about every node does not scan the graph per node."""
    index: dict[str, onnx.TensorProto] = {}
    for t in model.graph.initializer:
        index.setdefault(t.name, t)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] not in index:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                index[node.output[0]] = value
    return index


#: ONNX element types find_weighted_layers accepts as a float weight.
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16})


def find_weighted_layers(model: onnx.ModelProto) -> list[WeightedLayer]:
    """Every Gemm/MatMul with a 2-D constant weight, in graph order."""
    layers = []
    constants = _constant_index(model)
    for node in model.graph.node:
        if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2:
            continue
        t = constants.get(node.input[1])
        if t is None or len(t.dims) != 2 or t.data_type not in _FLOAT_TYPES:
            continue
        shape = tuple(int(d) for d in t.dims)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm":
            if attrs.get("transA", 0):
                continue
            axis = 0 if attrs.get("transB", 0) else 1
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        else:
            axis, bias = 1, None
        layers.append(WeightedLayer(node.name, node.op_type, node.input[0], node.input[1], bias, axis,
                                    shape[1 - axis], shape[axis]))
    return layers


@dataclass(frozen=True)
class ActivationMatMul:
    """A MatMul of two computed tensors (no constant operand), such as attention's Q·Kᵀ and A·V.

    ``role``: ``attention-scores`` when the product flows (through scaling, mask or cast ops) into a
    ``Softmax``; ``attention-values`` when its first operand comes from a ``Softmax``; else ``matmul``.
    ``block`` is the node's scope (its name without the last path component, e.g.
    ``/blocks/blocks.0/attn``), used to group layers of one attention block in reports.
    """

    node: str
    inputs: tuple[str, str]
    role: str
    block: str


#: Ops between an attention product and its Softmax (scale, mask, cast) or after a Softmax (cast, reshape).
_ATTENTION_GLUE = frozenset({"Mul", "Div", "Add", "Where", "Cast", "Reshape", "Transpose", "Identity"})


def node_scope(name: str) -> str:
    """``/inner/blocks/blocks.0/attn/MatMul`` → ``/inner/blocks/blocks.0/attn`` (``""`` for a flat name)."""
    return name.rsplit("/", 1)[0] if "/" in name.strip("/") else ""


def _dequantized_constant(constants: dict[str, onnx.TensorProto], node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "DequantizeLinear" and node.input[0] in constants


def find_activation_matmuls(model: onnx.ModelProto) -> list[ActivationMatMul]:
    """Every MatMul whose two operands are both computed tensors (not weights, nor dequantized weights)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def feeds_softmax(tensor: str, depth: int = 0) -> bool:
        for c in consumers.get(tensor, []):
            if c.op_type == "Softmax" or (c.op_type in _ATTENTION_GLUE and depth < 4
                                          and feeds_softmax(c.output[0], depth + 1)):
                return True
        return False

    def from_softmax(tensor: str, depth: int = 0) -> bool:
        p = producer.get(tensor)
        if p is None:
            return False
        return p.op_type == "Softmax" or (p.op_type in _ATTENTION_GLUE and depth < 4 and bool(p.input)
                                          and from_softmax(p.input[0], depth + 1))

    constants = _constant_index(model)
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        if any(i in constants or _dequantized_constant(constants, producer.get(i)) for i in node.input):
            continue
        role = ("attention-scores" if feeds_softmax(node.output[0]) else
                "attention-values" if from_softmax(node.input[0]) else "matmul")
        out.append(ActivationMatMul(node.name, (node.input[0], node.input[1]), role, node_scope(node.name)))
    return out
