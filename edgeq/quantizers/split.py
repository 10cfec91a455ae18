"""Outlier channel splitting (Zhao et al. 2019, OCS): widen a hidden layer so its outliers shrink, exactly in float.

A hidden unit ``k`` between two weight layers ``P`` (producer) and ``C`` (consumer), with only elementwise
ops between them (:func:`edgeq.quantizers.prune.hidden_layers`), is duplicated: row ``k`` of ``P`` (and its
bias, and the per-unit constants of the ops between) is copied to a new unit appended at the end, both
copies multiplied by ``a``, and column ``k`` of ``C`` becomes two columns ``C[:, k] / (2a)``. Both units
then carry ``f(a z_k)``, and ``C`` sees ``2 · C[:, k] / (2a) · f(a z_k) = C[:, k] f(z_k)`` wherever
``f(a z) = a f(z)``. Two splits:

``a = 1`` (weight split)
    The unit is copied and the consumer's column halved: the per-output-channel weight scale of every row
    whose largest weight sat in column ``k`` can halve. Exact for any elementwise ops between the layers.
``a = 1/2`` (activation split)
    The unit's value is halved in both copies, the consumer's column copied: the channel that set the
    per-tensor activation range of ``C``'s input now has half the range. Exact only when the ops between
    are positively homogeneous (ReLU, LeakyReLU, PReLU, a constant Mul/Div, Identity).

``a`` is a power of two, so scaling is exact in float; only the order of the consumer's float sum changes
(outputs equal to ~1e-6). The result is an ordinary wider float graph; quantized, every layer is still one
INT8 GEMM (TensorRT and ONNX Runtime run it as any other layer).

Which units: :func:`choose_splits` greedily picks, per hidden layer, the split (unit, ``a``) that lowers a
model of the consumer's quantization error the most, ``E = Σ_r s_r² S / 12 + (A/127)² ||W||²_F / 12``
(uniform rounding noise: ``s_r = max_j |W_rj| / 127`` per output row, ``S = Σ_j E[x_j²]`` on calibration
states; ``A = max_j max|x_j|`` the per-tensor input range), until ``fraction`` of the width is added or no
split lowers ``E``. Whether the splits are kept at all is decided by the plan's held-out action error
(:func:`edgeq.quantizers.build.build_plan`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from edgeq.calibration.collect import layer_rows, tensor_values
from edgeq.quantizers.prune import HiddenLayer, _const, _fix_shapes, _set_init, _shape, hidden_layers

__all__ = ["HOMOGENEOUS_OPS", "ChannelSplit", "apply_splits", "choose_splits", "merge_split_values",
           "split_error_model"]

#: Ops between two layers through which ``f(a z) = a f(z)`` holds for ``a > 0`` (activation split allowed).
HOMOGENEOUS_OPS = frozenset({"Relu", "LeakyRelu", "PRelu", "Identity", "Mul", "Div"})
SCALES = (1.0, 0.5)


@dataclass(frozen=True)
class ChannelSplit:
    """Split units of the hidden layer read by ``layer`` (the consumer's node name), in order.

    ``units[i]`` is split with scale ``scales[i]`` (1: weight split, 0.5: activation split); each new
    unit is appended, so a later entry may name a unit an earlier one appended (index = width so far).
    """

    layer: str
    units: tuple[int, ...]
    scales: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.units) != len(self.scales) or not self.units:
            raise ValueError(f"{self.layer}: units and scales must be non-empty and of the same length")
        bad = [s for s in self.scales if float(s) not in SCALES]
        if bad:
            raise ValueError(f"{self.layer}: split scales must be 1 or 0.5 (exact in float), got {bad}")

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "units": [int(u) for u in self.units], "scales": [float(s) for s in self.scales]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChannelSplit:
        return cls(str(d["layer"]), tuple(int(u) for u in d["units"]), tuple(float(s) for s in d["scales"]))


def _homogeneous(model: onnx.ModelProto, h: HiddenLayer) -> bool:
    ops = {n.name: n.op_type for n in model.graph.node}
    return all(ops[name] in HOMOGENEOUS_OPS for name in h.region)


def _append_unit(v: np.ndarray, k: int, a: float, axis: int) -> np.ndarray:
    """``v`` with slice ``k`` along ``axis`` multiplied by ``a`` and a copy of it appended."""
    out = np.array(v, np.float64, copy=True)
    idx = [slice(None)] * out.ndim
    idx[axis] = slice(k, k + 1)
    out[tuple(idx)] *= a
    return np.concatenate([out, out[tuple(idx)]], axis=axis)


def _split_one(model: onnx.ModelProto, h: HiddenLayer, k: int, a: float) -> None:
    """Split unit ``k`` of ``h`` in place (initializers of ``model`` rewritten)."""
    p, c = h.producer, h.consumer
    dtype = lambda name: _const(model, name).dtype  # type: ignore[union-attr]  # noqa: E731
    wp, wc = _const(model, p.weight), _const(model, c.weight)
    assert wp is not None and wc is not None
    _set_init(model, p.weight, _append_unit(wp, k, a, p.weight_axis).astype(dtype(p.weight)))
    bias_name = p.bias
    if h.bias_add is not None:
        node = next(n for n in model.graph.node if n.name == h.bias_add)
        bias_name = next(i for i in node.input if _const(model, i) is not None)
    width = wc.shape[1 - c.weight_axis]
    if bias_name:
        b = _const(model, bias_name)
        assert b is not None
        flat = _append_unit(b.reshape(-1), k, a, 0)
        _set_init(model, bias_name, flat.reshape(_shape(b, width + 1)).astype(b.dtype))
    for name in h.region:  # per-unit constants of the ops between (an affine, a PReLU slope): copied
        node = next(n for n in model.graph.node if n.name == name)
        for i in node.input:
            v = _const(model, i)
            if v is not None and v.size == width and width > 1:
                flat = _append_unit(v.reshape(-1), k, 1.0, 0)
                _set_init(model, i, flat.reshape(_shape(v, width + 1)).astype(v.dtype))
    in_axis = 1 - c.weight_axis
    _set_init(model, c.weight, _append_unit(wc, k, 1.0 / (2.0 * a), in_axis).astype(wc.dtype))


def apply_splits(model: onnx.ModelProto, splits: Sequence[ChannelSplit]) -> onnx.ModelProto:
    """A copy of ``model`` with every split applied (the float function unchanged; node names kept).

    Raises:
        ValueError: a split names no hidden layer's consumer, a unit out of range, or an activation
            split (scale 0.5) where the ops between the layers are not positively homogeneous.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for sp in splits:
        hidden, _ = hidden_layers(out)
        h = next((x for x in hidden if x.consumer.node == sp.layer), None)
        if h is None:
            raise ValueError(f"channel split names layer {sp.layer!r}, which does not read a splittable hidden layer")
        if any(s != 1.0 for s in sp.scales) and not _homogeneous(out, h):
            raise ValueError(f"{sp.layer}: an activation split (scale 0.5) needs positively homogeneous ops between "
                             "the layers (ReLU, LeakyReLU, PReLU, Mul)")
        width = h.width
        for k, a in zip(sp.units, sp.scales, strict=True):
            if not 0 <= k < width:
                raise ValueError(f"{sp.layer}: unit {k} is out of range for a hidden width of {width}")
            _split_one(out, h, int(k), float(a))
            width += 1
            h.width = width
    _fix_shapes(out)
    return out


def merge_split_values(model: onnx.ModelProto, splits: Sequence[ChannelSplit], values: dict[str, np.ndarray]
                       ) -> dict[str, np.ndarray]:
    """Values of the split graph's hidden tensors mapped back to the unsplit ``model``'s widths.

    ``values`` maps tensor names to ``[rows, width']`` arrays read from a graph made by
    :func:`apply_splits` (float or quantized); each split unit ``k`` and its copy ``m`` merge back into
    ``(x_k + x_m) / (2a)``, the unsplit unit's value. Tensors no split touched are returned unchanged.
    """
    out = dict(values)
    hidden, _ = hidden_layers(model)
    by_consumer = {h.consumer.node: h for h in hidden}
    producers = {n.name: n for n in model.graph.node}
    for sp in splits:
        h = by_consumer.get(sp.layer)
        if h is None:
            continue
        names = [*producers[h.producer.node].output[:1], *(producers[h.bias_add].output[:1] if h.bias_add else []),
                 *(o for r in h.region for o in producers[r].output)]
        for t in dict.fromkeys(names):
            v = out.get(t)
            if v is None or v.ndim != 2 or v.shape[1] != h.width + len(sp.units):
                continue
            x = np.array(v, np.float64, copy=True)
            for i in range(len(sp.units) - 1, -1, -1):  # the last split's copy is the last column
                k, a, m = sp.units[i], sp.scales[i], h.width + i
                x[:, k] = (x[:, k] + x[:, m]) / (2.0 * a)
                x = x[:, :m]
            out[t] = x.astype(v.dtype)
    return out


def split_error_model(w: np.ndarray, m2: np.ndarray, cmax: np.ndarray, weight_qmax: float = 127.0) -> float:
    """The consumer's modelled quantization error ``Σ_r s_r² S/12 + (A/127)² ||W||² / 12`` (see the module);
    ``s_r = max_j |W_rj| / weight_qmax`` (127: int8 weights; 7: int4)."""
    s = np.abs(w).max(axis=1) / float(weight_qmax)
    return float((s ** 2).sum() * m2.sum() / 12.0 + (cmax.max() / 127.0) ** 2 * (w ** 2).sum() / 12.0)


def _greedy(w: np.ndarray, m2: np.ndarray, cmax: np.ndarray, n: int, activation_ok: bool, weight_qmax: float = 127.0
            ) -> tuple[list[int], list[float], float, float]:
    """Up to ``n`` splits of the consumer weight ``w`` ``[out, in]`` lowering :func:`split_error_model`."""
    w, m2, cmax = np.array(w, np.float64), np.array(m2, np.float64), np.array(cmax, np.float64)
    units: list[int] = []
    scales: list[float] = []
    qw = float(weight_qmax)
    e0 = e = split_error_model(w, m2, cmax, qw)
    rows = np.arange(w.shape[0])
    for _ in range(n):
        aw = np.abs(w)
        order = np.argsort(-aw, axis=1)
        top1, top2 = aw[rows, order[:, 0]], aw[rows, order[:, 1]] if w.shape[1] > 1 else np.zeros(len(w))
        others = np.where(order[:, :1] == np.arange(w.shape[1])[None, :], top2[:, None], top1[:, None])  # max_{j!=k}
        f2 = (w ** 2).sum()
        s_sum, col2 = m2.sum(), (w ** 2).sum(axis=0)
        a_cur = cmax.max() / 127.0
        # weight split (a = 1): column k halved and copied; input k duplicated
        s_new = np.maximum(others, aw / 2.0) / qw
        e_w = (s_new ** 2).sum(axis=0) * (s_sum + m2) / 12.0 + a_cur ** 2 * (f2 - col2 / 2.0) / 12.0
        best_k, best_a, best_e = int(np.argmin(e_w)), 1.0, float(np.min(e_w))
        if activation_ok:  # activation split (a = 1/2): channel k halved and copied; column k copied
            c_sorted = np.sort(cmax)
            c_other = np.where(cmax >= c_sorted[-1], c_sorted[-2] if len(cmax) > 1 else 0.0, c_sorted[-1])
            a_new = np.maximum(c_other, cmax / 2.0) / 127.0
            e_a = ((aw.max(axis=1) / qw) ** 2).sum() * (s_sum - m2 / 2.0) / 12.0 + a_new ** 2 * (f2 + col2) / 12.0
            k_a = int(np.argmin(e_a))
            if e_a[k_a] < best_e:
                best_k, best_a, best_e = k_a, 0.5, float(e_a[k_a])
        if best_e >= e * (1.0 - 1e-9):
            break
        k, a = best_k, best_a
        w = _append_unit(w, k, 1.0 / (2.0 * a), 1)
        m2 = _append_unit(m2, k, a * a, 0)
        cmax = _append_unit(cmax, k, a, 0)
        units.append(k)
        scales.append(a)
        e = split_error_model(w, m2, cmax, qw)
    return units, scales, e0, e


def choose_splits(model: onnx.ModelProto, states: np.ndarray, fraction: float, *, weight_qmax: float = 127.0,
                  activation_splits: bool = True) -> tuple[list[ChannelSplit], list[dict[str, Any]]]:
    """Per hidden layer, at most ``ceil(fraction × width)`` greedy splits (see the module), and a report row each.

    ``states`` are calibration states (the float policy's input). Layers whose ops are not positively
    homogeneous get weight splits only, and so does every layer with ``activation_splits=False``.
    ``weight_qmax``: the consumer's weight grid (127: int8; 7: the int4 grid of a W4A8 layer).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"split_outliers must be in [0, 1] (a fraction of each hidden layer's width), got {fraction}")
    hidden, _ = hidden_layers(model)
    if not hidden or fraction == 0.0:
        return [], []
    vals = tensor_values(model, np.asarray(states, np.float32), [h.consumer.input for h in hidden])
    splits, report = [], []
    for h in hidden:
        x = layer_rows(vals[h.consumer.input]).astype(np.float64)
        wc = _const(model, h.consumer.weight)
        assert wc is not None
        w = np.asarray(wc if h.consumer.weight_axis == 0 else wc.T, np.float64)  # [out, in]
        n = int(np.ceil(fraction * h.width))
        act_ok = _homogeneous(model, h) and activation_splits
        units, scales, e0, e1 = _greedy(w, (x ** 2).mean(axis=0), np.abs(x).max(axis=0), n, act_ok, weight_qmax)
        report.append({"layer": h.consumer.node, "width": h.width, "added": len(units),
                       "weight_splits": int(sum(s == 1.0 for s in scales)),
                       "activation_splits": int(sum(s == 0.5 for s in scales)),
                       "activation_split_allowed": act_ok, "modelled_error_ratio": e1 / e0 if e0 > 0 else 1.0})
        if units:
            splits.append(ChannelSplit(h.consumer.node, tuple(units), tuple(scales)))
    return splits, report
