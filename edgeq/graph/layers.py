"""A feed-forward policy as a list of layers, and its translation to a float ONNX graph.

Sources that hold raw weights (SB3 archives, state dicts) describe their deterministic action path
with these few layer types; :func:`layers_to_onnx` builds the graph, and :func:`fold_affines`
merges eval-mode normalization layers (BatchNorm, BatchRenorm) into the Linear that follows them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from edgeq.graph.builder import GraphBuilder
from edgeq.policy import ACTIONS_OUTPUT, OBS_INPUT


@dataclass
class Linear:
    """``y = x @ weight.T + bias`` (weight in nn.Linear's [out, in] layout)."""

    name: str
    weight: np.ndarray
    bias: np.ndarray | None


@dataclass
class Activation:
    kind: str  # relu, tanh, elu, leaky_relu, silu, sigmoid, gelu, softplus
    alpha: float | None = None


@dataclass
class Affine:
    """Elementwise ``y = x * scale + shift`` (an eval-mode BatchNorm/BatchRenorm)."""

    name: str
    scale: np.ndarray
    shift: np.ndarray


@dataclass
class Normalize:
    """Observation normalization ``clip((x - mean) / std, -clip, clip)``, kept in fp32."""

    name: str
    mean: np.ndarray
    std: np.ndarray
    clip: float | None


@dataclass
class Clip:
    low: np.ndarray | float
    high: np.ndarray | float
    name: str = "clip"


@dataclass
class Tanh:
    name: str = "squash"


@dataclass
class RescaleFromUnit:
    """[-1, 1] → [low, high], SB3's ``unscale_action``."""

    low: np.ndarray
    high: np.ndarray
    name: str = "rescale"


Layer = Linear | Activation | Affine | Normalize | Clip | Tanh | RescaleFromUnit


def fold_affines(layers: list[Layer], keep_leading: bool = True) -> tuple[list[Layer], list[str]]:
    """Fold every ``Affine`` that directly precedes a ``Linear`` into that Linear, exactly.

    For ``y = W (x * s + t) + b`` the folded layer is ``W' = W * s`` (scaling input column j by
    ``s_j``) and ``b' = b + W t``, computed in float64 then cast to float32.

    With ``keep_leading`` the affine that acts on the raw observation is not folded but kept as an
    fp32 pre-op: observation channels span very different ranges, so its ``s`` can be ~30x on some
    columns, and folding it would stretch those weight columns and ruin the per-output-channel int8
    weight scale of the first layer. Returns the new layer list and the names of folded layers.
    """
    out: list[Layer] = []
    folded: list[str] = []
    seen_weighted = False
    i = 0
    while i < len(layers):
        layer = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, Affine) and isinstance(nxt, Linear) and (seen_weighted or not keep_leading):
            w = nxt.weight.astype(np.float64)
            b = np.zeros(w.shape[0]) if nxt.bias is None else nxt.bias.astype(np.float64)
            s, t = layer.scale.astype(np.float64), layer.shift.astype(np.float64)
            out.append(Linear(nxt.name, (w * s[None, :]).astype(np.float32), (b + w @ t).astype(np.float32)))
            folded.append(layer.name)
            seen_weighted = True
            i += 2
            continue
        if isinstance(layer, Linear):
            seen_weighted = True
        out.append(layer)
        i += 1
    return out, folded


def emit_layers(g: GraphBuilder, x: str, layers: list[Layer], act_prefix: str = "act") -> str:
    """Append ``layers`` to ``g`` starting from tensor ``x``; returns the last tensor's name."""
    n_act = 0
    for layer in layers:
        if isinstance(layer, Linear):
            x = g.linear(x, layer.weight, layer.bias, layer.name)
        elif isinstance(layer, Activation):
            n_act += 1
            x = g.activation(x, layer.kind, f"{act_prefix}{n_act}", layer.alpha)
        elif isinstance(layer, Affine):
            y = g.op("Mul", [x, g.const(f"{layer.name}.scale", layer.scale)], f"{layer.name}_scaled")
            x = g.op("Add", [y, g.const(f"{layer.name}.shift", layer.shift)], layer.name)
        elif isinstance(layer, Normalize):
            x = g.normalize(x, layer.mean, layer.std, layer.clip, layer.name)
        elif isinstance(layer, Clip):
            x = g.clip(x, layer.low, layer.high, layer.name)
        elif isinstance(layer, Tanh):
            x = g.op("Tanh", [x], layer.name)
        elif isinstance(layer, RescaleFromUnit):
            x = g.rescale_from_unit(x, layer.low, layer.high, layer.name)
        else:  # pragma: no cover - the Layer union is closed
            raise TypeError(f"unknown layer {layer!r}")
    return x


def layers_to_onnx(layers: list[Layer], obs_dim: int, act_dim: int, graph_name: str,
                   metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """Build ``obs [batch, obs_dim] → actions [batch, act_dim]`` from ``layers``."""
    g = GraphBuilder(graph_name)
    x = emit_layers(g, OBS_INPUT, layers)
    g.output(x, ACTIONS_OUTPUT)
    return g.make_model([(OBS_INPUT, ["batch", obs_dim])], [(ACTIONS_OUTPUT, ["batch", act_dim])],
                        metadata=metadata)

