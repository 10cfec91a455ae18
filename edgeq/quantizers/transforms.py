"""Exact float-graph rewrites that move range from a layer's input into its weights.

One rewrite serves static CrossQuant (:mod:`edgeq.quantizers.crossquant`) and SmoothQuant-style
equalization (:mod:`edgeq.quantizers.equalize`); only the factors differ. For a weighted layer
``Y = X W^T + b`` (``W`` in the ``[out, in]`` view) and positive factors ``d`` (one per input
column ``j``)::

    Y = X W^T + b = (X diag(1/d)) (W diag(d))^T + b = X' W'^T + b

so the layer computes the same ``Y`` from ``X' = X / d`` (column ``j`` divided by ``d_j``) with the
weight ``W' = W diag(d)`` (input column ``j`` of ``W`` multiplied by ``d_j``). Where ``X / d`` is
computed decides the ``placement``:

``folded``
    ``X = relu(Z)`` (or LeakyReLU/PReLU-free positively homogeneous ``f``: ``f(z / d) = f(z) / d`` for
    ``d > 0``) with ``Z = A P^T + c`` produced by the previous weighted layer. Then
    ``X / d = relu((A P^T + c) / d) = relu(A (diag(1/d) P)^T + c / d)``: row ``j`` of ``P`` and
    ``c_j`` are divided by ``d_j``. Nothing is added to the graph, and the previous layer's
    per-output-channel int8 weight scale absorbs the row factor.
``mul``
    Otherwise (the first layer, whose input is the raw or normalized observation, or an input with
    other consumers) an explicit fp32 ``Mul(X, 1/d)`` is inserted in front of the layer: a float
    pre-op that TensorRT fuses with the following QuantizeLinear.

Every product is computed in float64 and rounded once to float32, so the rewritten float graph
matches the original to float32 rounding (tested to 1e-5 on the policies' actions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeq.graph.analysis import WeightedLayer, find_weighted_layers

__all__ = ["HOMOGENEOUS_ACTIVATIONS", "InputScaling", "apply_input_scalings", "can_fold", "weight_in_view"]

#: Activations ``f`` with ``f(z / d) = f(z) / d`` for every ``d > 0`` (positive homogeneity).
HOMOGENEOUS_ACTIVATIONS = ("Relu", "LeakyRelu")


@dataclass(frozen=True, eq=False)
class InputScaling:
    """Divide the input columns of layer ``layer`` by ``factors`` and multiply its weight by them.

    Attributes:
        layer: Node name of the Gemm/MatMul whose input is rescaled.
        factors: ``d``, float64 ``[in_features]``, strictly positive and finite.
        method: Who chose the factors (``crossquant``, ``equalize``, ...), for the manifest.
        alpha: The method's strength parameter, for the manifest.
        placement: ``folded`` or ``mul`` (see the module docstring); ``auto`` picks ``folded``
            where :func:`can_fold` allows it.
    """

    layer: str
    factors: np.ndarray
    method: str
    alpha: float
    placement: str = "auto"
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        d = np.asarray(self.factors, np.float64)
        if d.ndim != 1 or d.size == 0:
            raise ValueError(f"{self.layer}: factors must be a non-empty 1-D array, got shape {d.shape}")
        if not (np.all(np.isfinite(d)) and np.all(d > 0)):
            raise ValueError(f"{self.layer}: factors must be strictly positive and finite")
        if self.placement not in ("auto", "folded", "mul"):
            raise ValueError(f"{self.layer}: placement must be auto, folded or mul, got {self.placement!r}")
        object.__setattr__(self, "factors", d)

    def to_json(self) -> dict[str, Any]:
        """Summary for the manifest, with the exact ``factors`` (so a bundle's plan can be rebuilt)."""
        d = self.factors
        return {"layer": self.layer, "method": self.method, "alpha": self.alpha, "placement": self.placement,
                "factor_min": float(d.min()), "factor_max": float(d.max()),
                "factor_geomean": float(np.exp(np.mean(np.log(d)))), **self.details,
                "factors": [float(x) for x in d]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InputScaling:
        """The scaling a manifest entry describes; ``KeyError`` if it predates stored ``factors``."""
        summary = {"layer", "method", "alpha", "placement", "factor_min", "factor_max", "factor_geomean", "factors"}
        return cls(str(data["layer"]), np.asarray(data["factors"], np.float64), str(data["method"]),
                   float(data["alpha"]), str(data.get("placement", "auto")),
                   {k: v for k, v in data.items() if k not in summary})


def weight_in_view(w: np.ndarray, layer: WeightedLayer) -> np.ndarray:
    """The stored weight as ``[out, in]`` (a view; Gemm ``transB=1`` is stored that way already)."""
    return w if layer.weight_axis == 0 else w.T


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _init_index(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: i for i, t in enumerate(model.graph.initializer)}


def can_fold(model: onnx.ModelProto, layer: str) -> str | None:
    """The previous weighted layer's node name if ``1/d`` can be folded into it, else None.

    Folding needs: the layer input is the output of a Relu/LeakyRelu read by this layer only; that
    activation's input is the output of a Gemm (constant weight and bias, no other reader).
    """
    layers = {wl.node: wl for wl in find_weighted_layers(model)}
    wl = layers.get(layer)
    if wl is None:
        return None
    prod, cons = _producers(model), _consumers(model)
    act = prod.get(wl.input)
    if act is None or act.op_type not in HOMOGENEOUS_ACTIVATIONS or len(cons.get(wl.input, [])) != 1:
        return None
    prev = prod.get(act.input[0])
    if prev is None or prev.name not in layers or len(cons.get(act.input[0], [])) != 1:
        return None
    pl = layers[prev.name]
    inits = _init_index(model)
    if pl.weight not in inits or (pl.bias is not None and pl.bias not in inits):
        return None
    if len(cons.get(pl.weight, [])) != 1 or (pl.bias is not None and len(cons.get(pl.bias, [])) != 1):
        return None
    return prev.name


def _set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    idx = _init_index(model)[name]
    model.graph.initializer[idx].CopyFrom(numpy_helper.from_array(value, name))


def apply_input_scalings(model: onnx.ModelProto, scalings: Sequence[InputScaling]) -> onnx.ModelProto:
    """Return a float model computing the same function with every scaling applied (input unchanged).

    The scalings are applied in order; each names its layer by node name. The result's node names
    are the original ones (inserted ``Mul`` nodes are named ``<layer>/input_scale``), so a plan made
    for the result can name layers as the original graph does.

    Raises:
        ValueError: For an unknown layer, a factor vector of the wrong length, a weight shared
            with another node, or ``placement="folded"`` where folding is impossible.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for sc in scalings:
        _apply_one(m, sc)
    return m


def _apply_one(m: onnx.ModelProto, sc: InputScaling) -> None:
    layers = {wl.node: wl for wl in find_weighted_layers(m)}
    wl = layers.get(sc.layer)
    if wl is None:
        raise ValueError(f"input scaling names layer {sc.layer!r}, which is not a weighted layer of the graph")
    d = sc.factors
    if d.size != wl.in_features:
        raise ValueError(f"{sc.layer}: {d.size} factors for a layer with {wl.in_features} inputs")
    inits = _init_index(m)
    cons = _consumers(m)
    if wl.weight not in inits or len(cons.get(wl.weight, [])) != 1:
        raise ValueError(f"{sc.layer}: weight {wl.weight!r} is not an initializer read by this layer alone")
    w = numpy_helper.to_array(m.graph.initializer[inits[wl.weight]]).astype(np.float64)
    scale_shape = (1, -1) if wl.weight_axis == 0 else (-1, 1)  # multiply the input axis
    _set_init(m, wl.weight, (w * d.reshape(scale_shape)).astype(np.float32))

    prev = can_fold(m, sc.layer)
    placement = sc.placement
    if placement == "auto":
        placement = "folded" if prev is not None else "mul"
    if placement == "folded":
        if prev is None:
            raise ValueError(f"{sc.layer}: its input cannot take the factors by folding (it is not a ReLU of a "
                             "layer read by it alone)")
        pl = layers[prev]
        pw = numpy_helper.to_array(m.graph.initializer[inits[pl.weight]]).astype(np.float64)
        out_shape = (-1, 1) if pl.weight_axis == 0 else (1, -1)  # divide the output axis
        _set_init(m, pl.weight, (pw / d.reshape(out_shape)).astype(np.float32))
        if pl.bias is not None:
            pb = numpy_helper.to_array(m.graph.initializer[inits[pl.bias]]).astype(np.float64)
            _set_init(m, pl.bias, (pb / d.reshape(pb.shape)).astype(np.float32))
        return
    # explicit fp32 pre-op: X' = X * (1/d)
    node_idx = next(i for i, n in enumerate(m.graph.node) if n.name == sc.layer)
    const = f"{sc.layer}/input_scale.inv_factors"
    k = 1
    while const in inits:
        const = f"{sc.layer}/input_scale.inv_factors_{k}"
        k += 1
    scaled = f"{wl.input}.scaled_for.{sc.layer}"
    m.graph.initializer.append(numpy_helper.from_array((1.0 / d).astype(np.float32), const))
    mul = helper.make_node("Mul", [wl.input, const], [scaled], name=f"{sc.layer}/input_scale")
    node = m.graph.node[node_idx]
    node.input[0] = scaled
    m.graph.node.insert(node_idx, mul)
