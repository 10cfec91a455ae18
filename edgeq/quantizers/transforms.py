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
import onnx_ir as ir

from edgeq.graph.analysis import WeightedLayer
from edgeq.graph.ir import const, make_node, to_ir, to_onnx

__all__ = ["HOMOGENEOUS_ACTIVATIONS", "InputScaling", "apply_input_scalings", "can_fold", "scale_inputs",
           "weight_in_view"]

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
    #: an input shift ``δ`` (AffineQuant's translation, :mod:`edgeq.quantizers.affine`): the layer reads
    #: ``(X − δ) / d`` and its bias gains ``W δ``; only with the ``mul`` placement
    shift: np.ndarray | None = None

    def __post_init__(self) -> None:
        d = np.asarray(self.factors, np.float64)
        if d.ndim != 1 or d.size == 0:
            raise ValueError(f"{self.layer}: factors must be a non-empty 1-D array, got shape {d.shape}")
        if not (np.all(np.isfinite(d)) and np.all(d > 0)):
            raise ValueError(f"{self.layer}: factors must be strictly positive and finite")
        if self.placement not in ("auto", "folded", "mul"):
            raise ValueError(f"{self.layer}: placement must be auto, folded or mul, got {self.placement!r}")
        object.__setattr__(self, "factors", d)
        if self.shift is not None:
            sh = np.asarray(self.shift, np.float64)
            if sh.shape != d.shape or not np.all(np.isfinite(sh)):
                raise ValueError(f"{self.layer}: shift must be finite and of the factors' shape {d.shape}")
            if self.placement == "folded":
                raise ValueError(f"{self.layer}: a shifted input cannot be folded into the previous layer")
            object.__setattr__(self, "shift", sh)

    def to_json(self) -> dict[str, Any]:
        """Summary for the manifest, with the exact ``factors`` (so a bundle's plan can be rebuilt)."""
        d = self.factors
        return {"layer": self.layer, "method": self.method, "alpha": self.alpha, "placement": self.placement,
                "factor_min": float(d.min()), "factor_max": float(d.max()),
                "factor_geomean": float(np.exp(np.mean(np.log(d)))), **self.details,
                "factors": [float(x) for x in d],
                **({"shift": [float(x) for x in self.shift]} if self.shift is not None else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InputScaling:
        """The scaling a manifest entry describes; ``KeyError`` if it predates stored ``factors``."""
        summary = {"layer", "method", "alpha", "placement", "factor_min", "factor_max", "factor_geomean", "factors",
                   "shift"}
        return cls(str(data["layer"]), np.asarray(data["factors"], np.float64), str(data["method"]),
                   float(data["alpha"]), str(data.get("placement", "auto")),
                   {k: v for k, v in data.items() if k not in summary},
                   None if data.get("shift") is None else np.asarray(data["shift"], np.float64))


def weight_in_view(w: np.ndarray, layer: WeightedLayer) -> np.ndarray:
    """The stored weight as ``[out, in]`` (a view; Gemm ``transB=1`` is stored that way already)."""
    return w if layer.weight_axis == 0 else w.T


@dataclass(frozen=True)
class _Layer:
    """A weighted layer as IR handles (what :class:`~edgeq.graph.analysis.WeightedLayer` names)."""

    node: ir.Node
    input: ir.Value
    weight: ir.Value
    bias: ir.Value | None
    weight_axis: int
    in_features: int


def _weighted_layers(graph: ir.Graph) -> dict[str, _Layer]:
    """Every Gemm/MatMul with a 2-D float constant weight, by node name (as :func:`find_weighted_layers`)."""
    out: dict[str, _Layer] = {}
    for node in graph:
        if node.op_type not in ("Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        x, wv = node.inputs[0], node.inputs[1]
        t = None if wv is None else ir.convenience.get_const_tensor(wv)
        if x is None or wv is None or t is None or len(t.shape) != 2 or \
                t.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16):
            continue
        bias = None
        axis = 1
        if node.op_type == "Gemm":
            if node.attributes.get_int("transA"):
                continue
            axis = 0 if node.attributes.get_int("transB") else 1
            bias = node.inputs[2] if len(node.inputs) > 2 else None
        out[node.name or ""] = _Layer(node, x, wv, bias, axis, int(t.shape.numpy()[1 - axis]))
    return out


def _fold_target(layers: dict[str, _Layer], layer: str) -> str | None:
    wl = layers.get(layer)
    if wl is None:
        return None
    act = wl.input.producer()
    if act is None or act.op_type not in HOMOGENEOUS_ACTIVATIONS or len(wl.input.uses()) != 1:
        return None
    z = act.inputs[0]
    prev = None if z is None else z.producer()
    if z is None or prev is None or prev.name not in layers or len(z.uses()) != 1:
        return None
    pl = layers[prev.name or ""]
    if not pl.weight.is_initializer() or (pl.bias is not None and not pl.bias.is_initializer()):
        return None
    if len(pl.weight.uses()) != 1 or (pl.bias is not None and len(pl.bias.uses()) != 1):
        return None
    return prev.name


def can_fold(model: onnx.ModelProto, layer: str) -> str | None:
    """The previous weighted layer's node name if ``1/d`` can be folded into it, else None.

    Folding needs: the layer input is the output of a Relu/LeakyRelu read by this layer only; that
    activation's input is the output of a Gemm (constant weight and bias, no other reader).
    """
    return _fold_target(_weighted_layers(to_ir(model).graph), layer)


def _scaled(value: ir.Value, by: np.ndarray, divide: bool = False) -> None:
    """Replace an initializer's values by ``value × by`` (or ``/ by``), computed in float64, rounded once."""
    assert value.const_value is not None
    w = value.const_value.numpy().astype(np.float64)
    value.const_value = ir.Tensor(((w / by) if divide else (w * by)).astype(np.float32), name=value.name)


def apply_input_scalings(model: onnx.ModelProto, scalings: Sequence[InputScaling]) -> onnx.ModelProto:
    """Return a float model computing the same function with every scaling applied (input unchanged).

    The scalings are applied in order; each names its layer by node name. The result's node names
    are the original ones (inserted ``Mul`` nodes are named ``<layer>/input_scale``), so a plan made
    for the result can name layers as the original graph does.

    Raises:
        ValueError: For an unknown layer, a factor vector of the wrong length, a weight shared
            with another node, or ``placement="folded"`` where folding is impossible.
    """
    irm = to_ir(model)
    scale_inputs(irm.graph, scalings)
    return to_onnx(irm, model)


def scale_inputs(graph: ir.Graph, scalings: Sequence[InputScaling]) -> None:
    """:func:`apply_input_scalings` on an IR graph, in place (the pass itself)."""
    for sc in scalings:
        _apply_one(graph, sc)


def _apply_one(g: ir.Graph, sc: InputScaling) -> None:
    layers = _weighted_layers(g)
    wl = layers.get(sc.layer)
    if wl is None:
        raise ValueError(f"input scaling names layer {sc.layer!r}, which is not a weighted layer of the graph")
    d = sc.factors
    if d.size != wl.in_features:
        raise ValueError(f"{sc.layer}: {d.size} factors for a layer with {wl.in_features} inputs")
    if not wl.weight.is_initializer() or len(wl.weight.uses()) != 1:
        raise ValueError(f"{sc.layer}: weight {wl.weight.name!r} is not an initializer read by this layer alone")
    if sc.shift is not None:  # the bias gains W δ (W before the scaling), computed in float64
        assert wl.weight.const_value is not None
        w0 = wl.weight.const_value.numpy().astype(np.float64)
        _add_to_bias(g, wl, (w0 if wl.weight_axis == 0 else w0.T) @ sc.shift)
    _scaled(wl.weight, d.reshape((1, -1) if wl.weight_axis == 0 else (-1, 1)))  # multiply the input axis

    prev = None if sc.shift is not None else _fold_target(layers, sc.layer)
    placement = sc.placement
    if placement == "auto":
        placement = "folded" if prev is not None else "mul"
    if placement == "folded":
        if prev is None:
            raise ValueError(f"{sc.layer}: its input cannot take the factors by folding (it is not a ReLU of a "
                             "layer read by it alone)")
        pl = layers[prev]
        _scaled(pl.weight, d.reshape((-1, 1) if pl.weight_axis == 0 else (1, -1)), divide=True)  # output axis
        if pl.bias is not None:
            assert pl.bias.const_value is not None
            _scaled(pl.bias, d.reshape(pl.bias.const_value.shape.numpy()), divide=True)
        return
    # explicit fp32 pre-op: X' = X * (1/d), or (X - δ) * (1/d) with a shift
    name, k = f"{sc.layer}/input_scale.inv_factors", 1
    while name in g.initializers:
        name, k = f"{sc.layer}/input_scale.inv_factors_{k}", k + 1
    inv = const(g, (1.0 / d).astype(np.float32), name)
    x_in = wl.input
    if sc.shift is not None:
        shift = const(g, sc.shift.astype(np.float32), name.replace("inv_factors", "shift"))
        sub = make_node("Sub", [wl.input, shift], f"{wl.input.name}.shifted_for.{sc.layer}",
                        name=f"{sc.layer}/input_shift")
        g.insert_before(wl.node, sub)
        x_in = sub.outputs[0]
    mul = make_node("Mul", [x_in, inv], f"{wl.input.name}.scaled_for.{sc.layer}", name=f"{sc.layer}/input_scale")
    g.insert_before(wl.node, mul)
    wl.node.replace_input_with(0, mul.outputs[0])


def _add_to_bias(g: ir.Graph, wl: _Layer, delta: np.ndarray) -> None:
    """Add ``delta`` ``[out]`` to the layer's float bias: the Gemm's C (created if absent) or the constant of a
    MatMul's bias Add."""
    def bump(value: ir.Value) -> None:
        assert value.const_value is not None
        b = value.const_value.numpy()
        value.const_value = ir.Tensor((b.astype(np.float64) + delta.reshape(b.shape)).astype(b.dtype), name=value.name)

    if wl.bias is not None and wl.bias.is_initializer() and len(wl.bias.uses()) == 1:
        bump(wl.bias)
        return
    y = wl.node.outputs[0]
    uses = list(y.uses())
    if wl.node.op_type == "MatMul" and len(uses) == 1 and uses[0].node.op_type == "Add":
        add = uses[0].node
        other = add.inputs[1 - uses[0].idx]
        if other is not None and other.is_initializer() and other.const_value is not None and \
                other.const_value.numpy().size == delta.size and len(other.uses()) == 1:
            bump(other)
            return
    if wl.node.op_type == "Gemm" and wl.bias is None:
        c = const(g, delta.astype(np.float32), f"{wl.node.name}/input_shift.bias")
        while len(wl.node.inputs) < 3:
            wl.node.resize_inputs(len(wl.node.inputs) + 1)
        wl.node.replace_input_with(2, c)
        return
    raise ValueError(f"{wl.node.name}: an input shift needs a bias to absorb W δ (a Gemm, or a MatMul followed by "
                     "an Add of a constant read by it alone)")
