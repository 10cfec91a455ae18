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


def find_weighted_layers(model: onnx.ModelProto) -> list[WeightedLayer]:
    """Every Gemm/MatMul with a 2-D constant weight, in graph order."""
    layers = []
    for node in model.graph.node:
        if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = constant_value(model, node.input[1])
        if w is None or w.ndim != 2 or w.dtype not in (np.float32, np.float64, np.float16):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm":
            if attrs.get("transA", 0):
                continue
            axis = 0 if attrs.get("transB", 0) else 1
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        else:
            axis, bias = 1, None
        out_f = int(w.shape[axis])
        layers.append(WeightedLayer(node.name, node.op_type, node.input[0], node.input[1], bias, axis,
                                    int(w.shape[1 - axis]), out_f))
    return layers
