"""Structured pruning of hidden units before quantization (issue 12 part 5; Lu et al. 2024 on the interplay).

A hidden unit ``j`` between two weight layers ``L_i`` and ``L_{i+1}`` (with only elementwise ops
between them: the activation, a per-channel affine) is removed whole: row ``j`` of ``L_i`` (and its
bias) and column ``j`` of ``L_{i+1}``. Every runtime's GEMMs then really shrink, float and INT8.

Which units: the saliency of unit ``j`` is ``||W_{i+1}[:, j]||_2 × std(a_j)``, with ``a_j`` the unit's
value at ``L_{i+1}``'s input on calibration states. Removing the unit and adding its mean
``W_{i+1}[:, j] · mean(a_j)`` to ``L_{i+1}``'s bias leaves an error of ``W_{i+1}[:, j] (a_j − mean(a_j))``,
whose expected squared norm is ``||W_{i+1}[:, j]||² var(a_j)``: the saliency is its root. A unit that is
constant on the calibration states (a dead ReLU unit is always 0; a saturated one always its bound)
has saliency 0 and is removed exactly (the mean folded into the bias). ``ratio`` of each hidden
layer's units (at least one unit stays) with the lowest saliency go. Acceptance is not decided here:
the pruned and quantized policy is validated in closed loop against the original float policy by
the same verdict as every other configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgeq.errors import EdgeqError
from edgeq.graph.analysis import WeightedLayer, find_weighted_layers

#: Ops allowed between two weight layers (applied per element; constants must be scalars or per-unit vectors).
ELEMENTWISE = frozenset({"Relu", "Tanh", "Sigmoid", "Elu", "LeakyRelu", "Selu", "Softplus", "Gelu", "HardSigmoid",
                         "HardSwish", "Mul", "Add", "Sub", "Div", "Clip", "Identity", "Neg", "Abs", "Softsign",
                         "Mish", "Celu", "ThresholdedRelu", "PRelu"})


@dataclass
class HiddenLayer:
    """A prunable hidden width: the outputs of ``producer`` read by ``consumer`` through ``region`` nodes."""

    producer: WeightedLayer
    consumer: WeightedLayer
    bias_add: str | None  # an ``Add`` of a constant bias after a MatMul producer
    region: list[str] = field(default_factory=list)  # elementwise node names between the two layers
    width: int = 0


@dataclass
class PruneReport:
    """What was removed: per hidden layer the width before / after, the units and their saliency."""

    ratio: float
    layers: list[dict[str, Any]]
    skipped: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "saliency": "||W_next[:, j]||_2 x std(a_j) on calibration states; the unit's "
                "mean folded into the next bias", "layers": self.layers, "skipped": self.skipped}


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _const(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return None


def hidden_layers(model: onnx.ModelProto) -> tuple[list[HiddenLayer], list[str]]:
    """The prunable hidden widths of a float policy graph, and why other layer pairs are not prunable."""
    layers = find_weighted_layers(model)
    by_input = {wl.input: wl for wl in layers}
    consumers = _consumers(model)
    outputs = {o.name for o in model.graph.output}
    producer_of = {n.name: n for n in model.graph.node}
    found, skipped = [], []
    for wl in layers:
        node = producer_of[wl.node]
        width = wl.out_features
        start = node.output[0]
        bias_add = None
        nxt = consumers.get(start, [])
        if wl.op_type == "MatMul" and len(nxt) == 1 and nxt[0].op_type == "Add":
            other = [i for i in nxt[0].input if i != start]
            c = _const(model, other[0]) if other else None
            if c is not None and c.size == width:
                bias_add, start = nxt[0].name, nxt[0].output[0]
        # walk the elementwise region from ``start`` until exactly one weight layer reads it
        region: list[str] = []
        frontier, seen, consumer, ok = [start], {start}, None, True
        while frontier and ok:
            t = frontier.pop()
            if t in outputs:
                ok = False
                break
            for c in consumers.get(t, []):
                if t in by_input and by_input[t].node == c.name:
                    if consumer is not None and consumer.node != c.name:
                        ok = False
                    consumer = by_input[t]
                    continue
                if c.op_type not in ELEMENTWISE:
                    ok = False
                    break
                for i in c.input:
                    if i in seen or not i:
                        continue
                    v = _const(model, i)
                    if v is None or v.size not in (1, width):
                        ok = False
                if c.name not in region:
                    region.append(c.name)
                for o in c.output:
                    if o not in seen:
                        seen.add(o)
                        frontier.append(o)
        if consumer is None:
            continue  # the last layer (its outputs are the actions)
        if not ok or consumer.in_features != width:
            skipped.append(f"{wl.node} -> {consumer.node}: not only elementwise ops between them")
            continue
        found.append(HiddenLayer(wl, consumer, bias_add, region, width))
    return found, skipped


def _input_values(model: onnx.ModelProto, tensors: Sequence[str], observations: np.ndarray,
                  input_name: str) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    from edgeq.calibration.collect import instrumented

    sess = ort.InferenceSession(instrumented(model, tensors).SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(list(tensors), {input_name: np.asarray(observations, np.float32)})
    return {t: np.asarray(v, np.float64).reshape(len(observations), -1) for t, v in zip(tensors, got, strict=True)}


def unit_saliency(model: onnx.ModelProto, observations: np.ndarray, input_name: str = "obs"
                  ) -> list[tuple[HiddenLayer, np.ndarray, np.ndarray]]:
    """Per prunable hidden layer: (layer, saliency per unit, mean value per unit) on ``observations``."""
    hidden, _ = hidden_layers(model)
    if not hidden:
        return []
    values = _input_values(model, [h.consumer.input for h in hidden], observations, input_name)
    out = []
    for h in hidden:
        a = values[h.consumer.input]
        w = _const(model, h.consumer.weight)
        assert w is not None
        cols = w if h.consumer.weight_axis == 0 else w.T  # [out, in]
        norm = np.linalg.norm(np.asarray(cols, np.float64), axis=0)
        out.append((h, norm * a.std(axis=0), a.mean(axis=0)))
    return out


def _set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(t).dtype),
                                                                        name))
            return
    raise KeyError(name)


def prune_hidden_units(model: onnx.ModelProto, observations: np.ndarray, ratio: float, *,
                       input_name: str = "obs") -> tuple[onnx.ModelProto, PruneReport]:
    """A copy of ``model`` with ``ratio`` of every prunable hidden layer's units removed (lowest saliency first).

    ``observations`` are calibration states (the float policy's input). Raises :class:`EdgeqError` for a
    ratio outside [0, 1) or a policy with no prunable hidden layer (every layer pair must have only
    elementwise ops between them).
    """
    if not 0.0 <= ratio < 1.0:
        raise EdgeqError(f"--prune {ratio}: the fraction of hidden units to remove must be in [0, 1), e.g. 0.25")
    if len(observations) < 2:
        raise EdgeqError("pruning needs calibration states to rank the units (got fewer than 2)")
    first = unit_saliency(model, observations, input_name)
    _, skipped = hidden_layers(model)
    if not first:
        raise EdgeqError("this policy has no prunable hidden layer (two weight layers with only elementwise ops, "
                         "such as the activation, between them); run without --prune")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rows = []
    for k in range(len(first)):
        # layer by layer, each ranked on the model with the earlier layers already pruned
        h, sal, mean = unit_saliency(out, observations, input_name)[k]
        n_drop = min(int(round(ratio * h.width)), h.width - 1)
        order = np.argsort(sal, kind="stable")
        drop = np.sort(order[:n_drop])
        keep = np.setdiff1d(np.arange(h.width), drop)
        p, c = h.producer, h.consumer
        wp = _const(out, p.weight)
        wc = _const(out, c.weight)
        assert wp is not None and wc is not None
        _set_init(out, p.weight, np.take(wp, keep, axis=p.weight_axis))
        bias_name = p.bias
        if h.bias_add is not None:
            node = next(n for n in out.graph.node if n.name == h.bias_add)
            bias_name = next(i for i in node.input if _const(out, i) is not None)
        if bias_name:
            b = _const(out, bias_name)
            assert b is not None
            _set_init(out, bias_name, b.reshape(-1)[keep].reshape(_shape(b, len(keep))))
        for name in h.region:  # per-unit constants of the elementwise ops (an affine, a PReLU slope)
            node = next(n for n in out.graph.node if n.name == name)
            for i in node.input:
                v = _const(out, i)
                if v is not None and v.size == h.width and h.width > 1:
                    _set_init(out, i, v.reshape(-1)[keep].reshape(_shape(v, len(keep))))
        in_axis = 1 - c.weight_axis
        cols = np.take(wc, drop, axis=in_axis)  # the removed columns, [out, n_drop] or [n_drop, out]
        shift = (cols @ mean[drop]) if in_axis == 1 else (mean[drop] @ cols)
        _set_init(out, c.weight, np.take(wc, keep, axis=in_axis))
        _add_bias(out, c, shift.astype(np.float64))
        rows.append({"producer": p.node, "consumer": c.node, "width": h.width, "kept": int(len(keep)),
                     "removed": int(len(drop)), "constant_units_removed": int(np.sum(sal[drop] <= 1e-12)),
                     "removed_saliency_share": float(sal[drop].sum() / max(sal.sum(), 1e-30))})
    _fix_shapes(out)
    return out, PruneReport(float(ratio), rows, skipped)


def _shape(v: np.ndarray, n: int) -> tuple[int, ...]:
    return tuple(n if d > 1 else d for d in v.shape) if v.ndim else (n,)


def _add_bias(model: onnx.ModelProto, layer: WeightedLayer, shift: np.ndarray) -> None:
    """Add ``shift`` to the consumer layer's bias (creating a Gemm bias or an Add after a MatMul)."""
    if not np.any(shift):
        return
    node = next(n for n in model.graph.node if n.name == layer.node)
    if layer.bias:
        b = _const(model, layer.bias)
        assert b is not None
        _set_init(model, layer.bias, (b.reshape(-1) + shift).reshape(b.shape))
        return
    consumers = _consumers(model).get(node.output[0], [])
    if layer.op_type == "MatMul" and len(consumers) == 1 and consumers[0].op_type == "Add":
        for i in consumers[0].input:
            b = _const(model, i)
            if b is not None and b.size == shift.size:
                _set_init(model, i, (b.reshape(-1) + shift).reshape(b.shape))
                return
    name = f"{layer.node}/pruned_mean_bias"
    model.graph.initializer.append(numpy_helper.from_array(shift.astype(np.float32), name))
    if layer.op_type == "Gemm":
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
        return
    y = node.output[0]
    node.output[0] = y + "/before_pruned_mean"
    idx = list(model.graph.node).index(node)
    model.graph.node.insert(idx + 1, onnx.helper.make_node("Add", [node.output[0], name], [y],
                                                           name=f"{layer.node}/pruned_mean"))


def _fix_shapes(model: onnx.ModelProto) -> None:
    """Drop stale intermediate shapes (the widths changed) and re-infer them."""
    del model.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        model.graph.value_info.extend(inferred.graph.value_info)
    except Exception:  # shape inference is a convenience here, never required
        pass
