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


def check_layers(layers: list[Layer], obs_dim: int, act_dim: int, origin: str) -> None:
    """Raise :class:`PolicyFormatError` naming the first layer whose shapes do not chain from ``obs_dim`` to
    ``act_dim``, whose values are NaN/inf, or that is above edgeq's size limits (checked before the graph
    is built, so a bad state dict is one clear message rather than an ONNX shape-inference error)."""
    from edgeq.errors import BrokenFloatPolicyError, PolicyFormatError
    from edgeq.ingest.limits import MAX_ABS_WEIGHT, MAX_LAYERS, check_dim

    if len(layers) > MAX_LAYERS:
        raise PolicyFormatError(f"{origin}: {len(layers)} layers, above edgeq's limit of {MAX_LAYERS}")
    check_dim(obs_dim, f"{origin}: observation size")
    check_dim(act_dim, f"{origin}: action size")
    width = obs_dim

    def vector(name: str, what: str, value: np.ndarray | float, n: int, *, allow_inf: bool = False) -> None:
        arr = np.asarray(value)
        if arr.ndim and arr.shape != (n,):
            raise PolicyFormatError(f"{origin}: {name} {what} has shape {arr.shape}, expected ({n},) to match the "
                                    "layer before it")
        bad = np.isnan(arr) if allow_inf else ~np.isfinite(arr)
        if np.any(bad):
            raise BrokenFloatPolicyError(f"{origin}: {name} {what} holds NaN/inf values; the policy is broken in float "
                                    "(retrain it or load an earlier checkpoint)")

    for layer in layers:
        if isinstance(layer, Linear):
            w = layer.weight
            if w.ndim != 2:
                raise PolicyFormatError(f"{origin}: {layer.name}.weight has shape {w.shape}, expected [out, in]")
            check_dim(int(w.shape[0]), f"{origin}: {layer.name}.weight output size")
            if w.shape[1] != width:
                raise PolicyFormatError(f"{origin}: {layer.name}.weight has shape {tuple(w.shape)}: it takes "
                                        f"{w.shape[1]} inputs but the layer before it gives {width}")
            if not np.all(np.isfinite(w)):
                raise BrokenFloatPolicyError(f"{origin}: {layer.name}.weight holds NaN/inf values; the policy is "
                                             "broken in float (retrain it or load an earlier checkpoint)")
            if w.size and float(np.abs(w).max()) > MAX_ABS_WEIGHT:
                raise BrokenFloatPolicyError(f"{origin}: {layer.name}.weight reaches {float(np.abs(w).max()):.3g}, "
                                             f"above {MAX_ABS_WEIGHT:g}; no trained policy has such weights, so it "
                                             "is broken in float (retrain it or load an earlier checkpoint)")
            width = int(w.shape[0])
            if layer.bias is not None:
                vector(layer.name, "bias", layer.bias, width)
        elif isinstance(layer, Affine):
            vector(layer.name, "scale", layer.scale, width)
            vector(layer.name, "shift", layer.shift, width)
        elif isinstance(layer, Normalize):
            vector(layer.name, "mean", layer.mean, width)
            vector(layer.name, "std", layer.std, width)
            if np.any(np.asarray(layer.std) <= 0):
                raise PolicyFormatError(f"{origin}: {layer.name} std has values <= 0; expected positive")
        elif isinstance(layer, RescaleFromUnit):
            vector(layer.name, "low", layer.low, width)
            vector(layer.name, "high", layer.high, width)
        elif isinstance(layer, Clip):
            vector(layer.name, "low", layer.low, width, allow_inf=True)
            vector(layer.name, "high", layer.high, width, allow_inf=True)
    if width != act_dim:
        raise PolicyFormatError(f"{origin}: the last layer gives {width} values but the action space has "
                                f"{act_dim}")
