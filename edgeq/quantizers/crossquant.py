"""CrossQuant (arXiv 2410.07505): quantize activations with a row and a column scale.

For an activation matrix ``X`` (rows ``i`` = samples, columns ``j`` = channels) CrossQuant uses::

    t_i = max_j |X_ij|          (row absmax, known only at run time)
    c_j = max_i |X_ij|          (column absmax, from calibration: ``TensorObserver.channel_absmax``)
    scale_ij = t_i^a * c_j^(1-a) / 127          (a = 1: per-sample; the paper uses a = 0.15)

Since ``|X_ij| = |X_ij|^a |X_ij|^(1-a) <= t_i^a c_j^(1-a)``, no element of a calibrated range is
clipped. A weighted layer ``Y = X W^T + b`` (``W`` as ``[out, in]``, quantized per output channel
``k`` as ``W ~ diag(sigma) Qw``) is run in two forms.

Static form (TensorRT)
    A static graph has no ``t_i``; it is replaced by one calibrated number ``T`` per tensor, so
    ``scale_ij = s * d_j`` with ``d_j = c_j^(1-a)`` and ``s = T^a / 127``. Then::

        Q(X)_ij = s d_j clip(rint(X_ij / (s d_j)), -127, 127) = d_j * Q_s(X / d)_ij
        Q(X) W^T = Q_s(X') diag(d) W^T = Q_s(X') (W diag(d))^T,        X' = X diag(1/d)

    i.e. the column factor moves into the weight (``W' = W diag(d)``, then quantized per output
    channel as usual) and what is left is a **per-tensor static quantizer** on ``X'`` whose scale
    ``s = amax(X') / 127`` is calibrated from ``X'``'s own statistics (a second pass over the stored
    calibration states, :func:`edgeq.calibration.collect.observe_states`). With ``a = 0`` and the
    max calibrator, ``amax(X') = 1``: every input channel gets its own scale ``c_j / 127``.
    ``X' = X / d`` is computed where it costs nothing (folded into the previous layer through a
    ReLU) or by an fp32 ``Mul`` pre-op (first layer): see :mod:`edgeq.quantizers.transforms`.

Dynamic form (ONNX Runtime on CPU; not TensorRT-compatible)
    ``t_i`` is computed in the graph for every row. With ``r_i = max(t_i, eps)^a / 127``::

        q_ij = clip(rint(X_ij / (r_i d_j)), -127, 127)                       (int8)
        Y_ik ~ sum_j (r_i d_j q_ij)(sigma_k Qw'_kj) + b_k = r_i sigma_k (q Qw'^T)_ik + b_k

    where ``Qw'``/``sigma`` quantize ``W' = W diag(d)`` per output channel. ONNX ops:
    ``Abs, ReduceMax, Max, Pow, Div, Mul, Round, Clip, Cast`` (float32), ``MatMulInteger`` (int8 x
    int8 -> int32) and a float rescale ``Cast, Mul, Mul, Add`` — all run by ONNX Runtime's CPU
    provider, the GEMM in integers. :func:`dynamic_reference` computes the same thing in numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnx_ir as ir

from edgeq.graph.ir import const, op

__all__ = [
    "DEFAULT_ALPHA",
    "ROW_EPS",
    "crossquant_static_factors",
    "dynamic_layer_nodes",
    "dynamic_quantize_reference",
    "dynamic_reference",
]

DEFAULT_ALPHA = 0.15
"""The paper's row exponent ``a``."""

ROW_EPS = 1e-12
"""Floor of ``t_i`` (an all-zero row quantizes to zeros instead of dividing by zero)."""

_RELATIVE_FLOOR = 1e-6


def crossquant_static_factors(channel_absmax: npt.ArrayLike, alpha: float) -> npt.NDArray[np.float64]:
    """``d_j = c_j^(1 - alpha)``, the column factor moved into the weights (float64, > 0).

    Channels that never left zero (or below ``1e-6 * max c``) get ``d_j`` of the floor value, so
    ``1 / d`` stays finite; they carry (almost) nothing, and the factor only rescales them.

    Raises:
        ValueError: For ``alpha`` outside ``[0, 1]`` or a non-finite/negative ``channel_absmax``.
    """
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"CrossQuant alpha must be in [0, 1], got {alpha}")
    c = np.asarray(channel_absmax, np.float64).reshape(-1)
    if c.size == 0 or not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError("channel_absmax must be a non-empty array of finite non-negative values")
    top = float(c.max())
    if top <= 0.0:
        return np.ones_like(c)
    c = np.maximum(c, top * _RELATIVE_FLOOR)
    return np.power(c, 1.0 - a)


def dynamic_quantize_reference(x: npt.ArrayLike, factors: npt.ArrayLike, alpha: float
                               ) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """The dynamic form's int8 activations ``q`` and row scales ``r`` (float32, as the graph computes)."""
    x32 = np.asarray(x, np.float32)
    inv_d = (1.0 / np.asarray(factors, np.float64)).astype(np.float32)
    t = np.maximum(np.abs(x32).max(axis=1, keepdims=True), np.float32(ROW_EPS))
    p = t if alpha == 1.0 else np.power(t, np.float32(alpha)).astype(np.float32)
    inv = (np.float32(127.0) / p).astype(np.float32)
    y = ((x32 * inv_d) * inv).astype(np.float32)
    q = np.clip(np.rint(y), -127, 127).astype(np.int8)
    r = (p / np.float32(127.0)).astype(np.float32)
    return q, r


def dynamic_reference(x: npt.ArrayLike, weight_q: npt.ArrayLike, weight_scale: npt.ArrayLike,
                      bias: npt.ArrayLike | None, factors: npt.ArrayLike, alpha: float) -> npt.NDArray[np.float32]:
    """numpy reference of the dynamic CrossQuant layer (``weight_q`` as ``[out, in]`` int8)."""
    q, r = dynamic_quantize_reference(x, factors, alpha)
    acc = q.astype(np.int32) @ np.asarray(weight_q, np.int32).T
    y = (acc.astype(np.float32) * r) * np.asarray(weight_scale, np.float32)[None, :]
    if bias is not None:
        y = y + np.asarray(bias, np.float32)
    return y.astype(np.float32)


def dynamic_layer_nodes(graph: ir.Graph, x: ir.Value, out: str, base: str, weight_q_kn: np.ndarray,
                        weight_scale: np.ndarray, bias: ir.Value | None, factors: np.ndarray, alpha: float,
                        opset: int) -> tuple[list[ir.Node], ir.Value]:
    """IR nodes of one dynamic CrossQuant layer ``x -> out`` (its constants registered in ``graph``).

    ``weight_q_kn`` is the int8 weight stored ``[in, out]`` (MatMulInteger's B); ``bias`` is a float
    initializer value or None. Returns ``(nodes, output value)``; the caller puts the nodes in place.
    """
    w = const(graph, weight_q_kn.astype(np.int8), f"{base}.int8")
    scale = const(graph, np.asarray(weight_scale, np.float32), f"{base}.scale")
    inv_factors = const(graph, (1.0 / np.asarray(factors, np.float64)).astype(np.float32), f"{base}.inv_factors")
    eps = const(graph, np.array(ROW_EPS, np.float32), f"{base}.eps")
    qmax = const(graph, np.array(127.0, np.float32), f"{base}.qmax")
    qmin = const(graph, np.array(-127.0, np.float32), f"{base}.qmin")
    n: list[ir.Node] = []

    def node(op_type: str, inputs: list[ir.Value | None], name: str, **attrs: Any) -> ir.Value:
        return op(n, op_type, inputs, f"{base}/{name}", name=f"{base}/{name}", **attrs)

    a = node("Abs", [x], "abs")
    if opset >= 18:
        t = node("ReduceMax", [a, const(graph, np.array([1], np.int64), f"{base}.axes")], "row_absmax", keepdims=1)
    else:
        t = node("ReduceMax", [a], "row_absmax", axes=[1], keepdims=1)
    t = node("Max", [t, eps], "row_absmax_floor")
    if alpha != 1.0:
        t = node("Pow", [t, const(graph, np.array(alpha, np.float32), f"{base}.alpha")], "row_pow")
    inv = node("Div", [qmax, t], "row_inv_scale")
    y = node("Mul", [node("Mul", [x, inv_factors], "col_scaled"), inv], "scaled")
    q = node("Cast", [node("Clip", [node("Round", [y], "round"), qmin, qmax], "clip")], "q", to=3)  # INT8
    acc = node("MatMulInteger", [q, w], "matmul_integer")
    r = node("Div", [t, qmax], "row_scale")
    yf = node("Mul", [node("Mul", [node("Cast", [acc], "acc_float", to=1), r], "row_rescale"), scale],
              "col_rescale" if bias is not None else "out")
    if bias is not None:
        return n, op(n, "Add", [yf, bias], out, name=f"{base}/bias")
    return n, op(n, "Identity", [yf], out, name=f"{base}/identity")
