"""Per-output-channel symmetric int8 weight quantizers (narrow range ``[-127, 127]``).

``q = clip(rint(w / scale), -127, 127)`` with ``np.rint`` (round half to even, as ONNX
QuantizeLinear) and one float32 ``scale`` per slice along ``axis``; ``dequantize`` is
``q * scale`` in float32, as DequantizeLinear computes it.

========= ============================================================================================
method    per-channel scale
========= ============================================================================================
absmax    ``absmax / 127``: nothing is clipped, every error is at most ``scale / 2``.
mse       ``amax / 127`` with ``amax`` from a grid of ``num_candidates`` values in
          ``[min_ratio * absmax, absmax]`` minimizing the channel's squared reconstruction error,
          measured exactly as :meth:`QuantizedWeight.dequantize` reconstructs. ``absmax`` is one of
          the candidates and only a strictly smaller error replaces it, so the result is never worse
          than ``absmax`` for any channel.
========= ============================================================================================

Dead channels: a channel whose ``absmax / 127`` is not a normal positive float32 (all zeros, or
values below ~1.5e-36) gets ``scale = DEAD_CHANNEL_SCALE`` (1.0) and ``q = 0``: it dequantizes to
exact zeros, and the scale is never 0, subnormal or NaN (which runtimes reject or mishandle).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEAD_CHANNEL_SCALE",
    "QMAX",
    "WEIGHT_QUANTIZERS",
    "QuantizedWeight",
    "quantize_weight",
    "quantize_weight_absmax",
    "quantize_weight_mse",
]

QMAX = 127
"""Largest quantized magnitude (narrow range: -128 is never used)."""

DEAD_CHANNEL_SCALE = 1.0
"""Scale given to channels that are (numerically) all zero."""

_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A weight tensor quantized per channel along ``axis``.

    Attributes:
        q: int8 array of the weight's shape, values in ``[-127, 127]``.
        scale: float32 1-D array of length ``q.shape[axis]``, strictly positive and finite.
        axis: The channel axis (non-negative).
    """

    q: np.ndarray
    scale: np.ndarray
    axis: int

    def __post_init__(self) -> None:
        """Check the invariants; raise ValueError if any is broken."""
        if self.q.dtype != np.int8:
            raise ValueError(f"q must be int8, got {self.q.dtype}")
        if not 0 <= self.axis < self.q.ndim:
            raise ValueError(f"axis {self.axis} out of range for a {self.q.ndim}-D weight")
        if self.scale.dtype != np.float32 or self.scale.shape != (self.q.shape[self.axis],):
            raise ValueError(
                f"scale must be float32 of shape ({self.q.shape[self.axis]},), "
                f"got {self.scale.dtype} {self.scale.shape}"
            )
        if not (np.all(np.isfinite(self.scale)) and np.all(self.scale > 0)):
            raise ValueError("scale must be strictly positive and finite")
        if self.q.size and int(np.abs(self.q.astype(np.int16)).max()) > QMAX:
            raise ValueError("q must be in the narrow range [-127, 127]")

    def scale_broadcast(self) -> npt.NDArray[np.float32]:
        """Return ``scale`` reshaped to broadcast against ``q`` (size 1 on every other axis)."""
        shape = [1] * self.q.ndim
        shape[self.axis] = self.scale.size
        return self.scale.reshape(shape)

    def dequantize(self) -> npt.NDArray[np.float32]:
        """Return ``q * scale`` in float32 (what ONNX DequantizeLinear computes)."""
        return self.q.astype(np.float32) * self.scale_broadcast()


def _prepare(w: npt.ArrayLike, axis: int) -> tuple[npt.NDArray[np.floating[Any]], int]:
    arr = np.asarray(w)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"weight must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise ValueError("weight must have at least one axis (got a scalar)")
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"axis must be an integer, got {axis!r}")
    if not -arr.ndim <= axis < arr.ndim:
        raise ValueError(f"axis {axis} is out of range for a weight of shape {arr.shape}")
    ax = int(axis) % arr.ndim
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"weight of shape {arr.shape} holds NaN or inf")
    return arr, ax


def _reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis)


def _channel_absmax(w: np.ndarray, axis: int) -> npt.NDArray[np.float64]:
    """``max |w|`` per slice along ``axis`` (0 for an empty slice), float64."""
    absw = np.abs(w).astype(np.float64, copy=False)
    if w.size == 0:
        return np.zeros(w.shape[axis], dtype=np.float64)
    return np.asarray(absw.max(axis=_reduce_axes(w.ndim, axis)), dtype=np.float64).reshape(-1)


def _scales_from_amax(amax: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """float32 ``amax / 127`` and the mask of live channels (normal positive scale)."""
    scale = (amax / QMAX).astype(np.float32)
    live = scale >= _FLOAT32_TINY
    return np.where(live, scale, np.float32(DEAD_CHANNEL_SCALE)).astype(np.float32), live


def _quantize(
    w: np.ndarray, scale: npt.NDArray[np.float32], live: npt.NDArray[np.bool_], axis: int
) -> np.ndarray:
    shape = [1] * w.ndim
    shape[axis] = scale.size
    s = scale.reshape(shape)
    q = np.clip(np.rint(w / s), -QMAX, QMAX)
    q = np.where(live.reshape(shape), q, 0.0)
    return q.astype(np.int8)


def _channel_sse(
    w: np.ndarray, q: np.ndarray, scale: npt.NDArray[np.float32], axis: int
) -> npt.NDArray[np.float64]:
    """Per-channel ``sum (w - dequantize)**2`` in float64, reconstruction as in ``dequantize``."""
    shape = [1] * w.ndim
    shape[axis] = scale.size
    deq = q.astype(np.float32) * scale.reshape(shape)
    err = w.astype(np.float64) - deq.astype(np.float64)
    return np.asarray(np.square(err).sum(axis=_reduce_axes(w.ndim, axis)), dtype=np.float64).reshape(-1)


def quantize_weight_absmax(w: npt.ArrayLike, axis: int) -> QuantizedWeight:
    """Quantize ``w`` per channel along ``axis`` with ``scale = absmax / 127`` (float32).

    Args:
        w: Real weight array (any float dtype; integers are converted).
        axis: The output-channel axis (negative counts from the end).

    Raises:
        ValueError: For a bad axis, a scalar, a non-real dtype, or NaN/inf in ``w``.
    """
    arr, ax = _prepare(w, axis)
    scale, live = _scales_from_amax(_channel_absmax(arr, ax))
    return QuantizedWeight(_quantize(arr, scale, live, ax), scale, ax)


def quantize_weight_mse(
    w: npt.ArrayLike, axis: int, num_candidates: int = 100, min_ratio: float = 0.5
) -> QuantizedWeight:
    """Quantize ``w`` per channel with the clipping threshold minimizing the squared error.

    For each channel, ``amax`` is searched on ``np.linspace(min_ratio, 1, num_candidates) * absmax``
    (vectorized over channels; memory ``O(w.size)``). The error of each candidate is measured
    exactly as the final reconstruction; ties keep the larger threshold, so the per-channel error is
    never above :func:`quantize_weight_absmax`'s.

    Args:
        w: Real weight array.
        axis: The output-channel axis.
        num_candidates: Grid size (>= 1; 1 is the absmax method).
        min_ratio: Smallest candidate as a fraction of absmax, in ``(0, 1]``.

    Raises:
        ValueError: For a bad axis/weight or out-of-range search parameters.
    """
    if int(num_candidates) < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    if not 0.0 < float(min_ratio) <= 1.0:
        raise ValueError(f"min_ratio must be in (0, 1], got {min_ratio}")
    arr, ax = _prepare(w, axis)
    absmax = _channel_absmax(arr, ax)
    best_scale, live = _scales_from_amax(absmax)
    best_q = _quantize(arr, best_scale, live, ax)
    best_err = _channel_sse(arr, best_q, best_scale, ax)
    ratios = np.linspace(float(min_ratio), 1.0, int(num_candidates))[:-1]
    shape = [1] * arr.ndim
    shape[ax] = absmax.size
    for r in ratios[::-1]:
        scale, cand_live = _scales_from_amax(absmax * r)
        cand_live &= live
        q = _quantize(arr, scale, cand_live, ax)
        err = _channel_sse(arr, q, scale, ax)
        better = (err < best_err) & cand_live
        if better.any():
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale).astype(np.float32)
            best_q = np.where(better.reshape(shape), q, best_q).astype(np.int8)
    return QuantizedWeight(best_q, best_scale, ax)


WEIGHT_QUANTIZERS: dict[str, Callable[..., QuantizedWeight]] = {
    "absmax": quantize_weight_absmax,
    "mse": quantize_weight_mse,
}
"""Weight quantization methods by name: ``fn(w, axis, **params) -> QuantizedWeight``."""


def quantize_weight(w: npt.ArrayLike, axis: int, method: str = "absmax") -> QuantizedWeight:
    """Quantize a weight per output channel along ``axis`` with the named method.

    Args:
        w: Real weight array (e.g. ``[out, in]`` for Gemm/MatMul^T, ``[out, in, kh, kw]`` for Conv).
        axis: The output-channel axis.
        method: One of :data:`WEIGHT_QUANTIZERS` (``absmax``, ``mse``).

    Returns:
        The int8 narrow-range values, float32 per-channel scales and the (non-negative) axis.

    Raises:
        ValueError: For an unknown method (the message lists the valid ones), a bad axis, or a
            weight that is not a finite real array.
    """
    fn = WEIGHT_QUANTIZERS.get(method)
    if fn is None:
        raise ValueError(
            f"unknown weight quantization method {method!r}; "
            f"valid methods: {', '.join(sorted(WEIGHT_QUANTIZERS))}"
        )
    return fn(w, axis)
