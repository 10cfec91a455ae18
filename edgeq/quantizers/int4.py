"""Symmetric int4 weights (W4A8's "W4"): per output channel, or in blocks along the input dimension.

``q = clip(rint(w / s), -7, 7)`` with ``np.rint`` (round half to even, as ONNX QuantizeLinear), one
float32 scale ``s`` per output channel (``block_size=0``) or per ``block_size`` consecutive inputs of an
output channel (blocked, the layout of ONNX ``DequantizeLinear``'s ``block_size`` attribute, opset 21).
The range is the narrow symmetric ``[-7, 7]`` of the INT4 storage type ``[-8, 7]``, zero point 0, so
that ``-w`` quantizes to ``-q`` exactly as in the int8 path.

========= ============================================================================================
method    scale of each group (a channel, or a block of a channel)
========= ============================================================================================
absmax    ``absmax / 7``: nothing clipped.
mse       ``amax / 7`` with ``amax`` from ``num_candidates`` values in ``[min_ratio * absmax, absmax]``
          minimizing the group's squared reconstruction error (absmax is a candidate and only a
          strictly smaller error replaces it). With 15 levels the clipping matters far more than in
          int8: MSE is the default.
========= ============================================================================================

Only 2-D weights (``Gemm``/``MatMul`` layers) are supported. A group whose scale would not be a normal
positive float32 gets scale 1.0 and ``q = 0`` (exact zeros), as in :mod:`edgeq.quantizers.weights`.

:func:`pack_int4` / :func:`unpack_int4` are ONNX's INT4 storage: two values per byte, the element of
even flat index in the low nibble, two's complement, an odd count padded with a zero nibble.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["INT4_QMAX", "INT4_METHODS", "Int4Weight", "pack_int4", "quantize_weight_int4", "unpack_int4"]

INT4_QMAX = 7
"""Largest quantized magnitude (narrow symmetric range ``[-7, 7]``)."""

INT4_METHODS = ("absmax", "mse")

_TINY = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True, eq=False)
class Int4Weight:
    """A 2-D weight quantized to int4, in the layer's stored orientation.

    Attributes:
        q: int8 array of the weight's shape holding values in ``[-7, 7]``.
        scale: float32; per channel (``block_size == 0``): shape ``(q.shape[axis],)``; blocked: 2-D, the
            weight's shape with the input axis (``1 - axis``) reduced to ``ceil(K / block_size)``.
        axis: The output-channel axis (0 for ``[out, in]``, 1 for ``[in, out]``).
        block_size: 0 (per channel) or the block length along the input axis.
    """

    q: np.ndarray
    scale: np.ndarray
    axis: int
    block_size: int = 0

    def __post_init__(self) -> None:
        if self.q.dtype != np.int8 or self.q.ndim != 2:
            raise ValueError(f"int4 q must be a 2-D int8 array, got {self.q.dtype} {self.q.shape}")
        if self.axis not in (0, 1):
            raise ValueError(f"axis must be 0 or 1 for a 2-D weight, got {self.axis}")
        if self.block_size < 0:
            raise ValueError(f"block_size must be >= 0, got {self.block_size}")
        if self.scale.dtype != np.float32 or self.scale.shape != self.scale_shape():
            raise ValueError(f"int4 scale must be float32 of shape {self.scale_shape()}, got "
                             f"{self.scale.dtype} {self.scale.shape}")
        if not (np.all(np.isfinite(self.scale)) and np.all(self.scale > 0)):
            raise ValueError("int4 scale must be strictly positive and finite")
        if self.q.size and int(np.abs(self.q.astype(np.int16)).max()) > INT4_QMAX:
            raise ValueError(f"int4 q must be in [-{INT4_QMAX}, {INT4_QMAX}]")

    @property
    def in_axis(self) -> int:
        return 1 - self.axis

    @property
    def blocks(self) -> int:
        """Scale groups per output channel (1 per channel)."""
        k = self.q.shape[self.in_axis]
        return 1 if self.block_size == 0 else -(-k // self.block_size)

    def scale_shape(self) -> tuple[int, ...]:
        if self.block_size == 0:
            return (int(self.q.shape[self.axis]),)
        shape = list(self.q.shape)
        shape[self.in_axis] = -(-shape[self.in_axis] // self.block_size)
        return tuple(int(s) for s in shape)

    def scale_full(self) -> npt.NDArray[np.float32]:
        """The scale of every element (the weight's shape)."""
        if self.block_size == 0:
            shape = [1, 1]
            shape[self.axis] = self.scale.size
            return np.broadcast_to(self.scale.reshape(shape), self.q.shape).astype(np.float32)
        k = self.q.shape[self.in_axis]
        return np.repeat(self.scale, self.block_size, axis=self.in_axis).take(range(k), axis=self.in_axis)

    def dequantize(self) -> npt.NDArray[np.float32]:
        """``q * scale`` in float32 (what ONNX DequantizeLinear computes)."""
        return (self.q.astype(np.float32) * self.scale_full()).astype(np.float32)

    def out_in(self) -> tuple[np.ndarray, np.ndarray]:
        """``(q, scale)`` as ``[out, in]`` and ``[out, blocks]`` arrays (per channel: ``[out, 1]``)."""
        q = self.q if self.axis == 0 else self.q.T
        if self.block_size == 0:
            s = self.scale.reshape(-1, 1)
        else:
            s = self.scale if self.axis == 0 else self.scale.T
        return np.ascontiguousarray(q), np.ascontiguousarray(s)

    def describe(self) -> str:
        return "int4 per-channel" if self.block_size == 0 else f"int4 blocks of {self.block_size}"


def _groups(w_oi: np.ndarray, block: int) -> np.ndarray:
    """``[out, blocks, block]`` view of ``[out, in]`` (the last block zero-padded)."""
    n, k = w_oi.shape
    nb = -(-k // block)
    pad = nb * block - k
    if pad:
        w_oi = np.concatenate([w_oi, np.zeros((n, pad), w_oi.dtype)], axis=1)
    return w_oi.reshape(n, nb, block)


def _q(g: np.ndarray, s: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(g / s[..., None]), -INT4_QMAX, INT4_QMAX)


def quantize_weight_int4(w: npt.ArrayLike, axis: int, *, block_size: int = 0, method: str = "mse",
                         num_candidates: int = 60, min_ratio: float = 0.3) -> Int4Weight:
    """Quantize a 2-D weight to symmetric int4 per output channel (``block_size=0``) or per block.

    Args:
        w: ``[out, in]`` (``axis=0``) or ``[in, out]`` (``axis=1``) real weight.
        axis: The output-channel axis.
        block_size: 0 for one scale per output channel, else the block length along the input axis
            (e.g. 32 or 64; TensorRT and ONNX Runtime's MatMulNBits need a power of two >= 16).
        method: ``absmax`` or ``mse`` (see the module docstring).

    Raises:
        ValueError: a weight that is not a finite 2-D real array, a bad axis/block/method.
    """
    arr = np.asarray(w)
    if arr.ndim != 2 or arr.dtype.kind not in "fiu":
        raise ValueError(f"int4 weights must be 2-D real arrays, got {arr.dtype} {arr.shape}")
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 or 1, got {axis}")
    if method not in INT4_METHODS:
        raise ValueError(f"unknown int4 weight method {method!r}; valid: {', '.join(INT4_METHODS)}")
    if int(block_size) < 0:
        raise ValueError(f"block_size must be >= 0, got {block_size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"weight of shape {arr.shape} holds NaN or inf")
    w_oi = np.asarray(arr if axis == 0 else arr.T, np.float64)
    n, k = w_oi.shape
    block = k if block_size == 0 else int(block_size)
    g = _groups(w_oi, block)
    absmax = np.abs(g).max(axis=2) if g.size else np.zeros(g.shape[:2])
    live = (absmax / INT4_QMAX).astype(np.float32) >= _TINY
    best_s = np.where(live, absmax / INT4_QMAX, 1.0).astype(np.float32)
    best_q = np.where(live[..., None], _q(g, best_s.astype(np.float64)), 0.0)
    if method == "mse" and g.size:
        best_e = np.square(g - best_q * best_s[..., None].astype(np.float64)).sum(axis=2)
        for r in np.linspace(float(min_ratio), 1.0, int(num_candidates))[:-1][::-1]:
            s = np.where(live, absmax * r / INT4_QMAX, 1.0).astype(np.float32)
            q = np.where(live[..., None], _q(g, s.astype(np.float64)), 0.0)
            e = np.square(g - q * s[..., None].astype(np.float64)).sum(axis=2)
            better = (e < best_e) & live & (s >= _TINY)
            if better.any():
                best_e = np.where(better, e, best_e)
                best_s = np.where(better, s, best_s).astype(np.float32)
                best_q = np.where(better[..., None], q, best_q)
    q_oi = best_q.reshape(n, -1)[:, :k].astype(np.int8)
    q_out = q_oi if axis == 0 else np.ascontiguousarray(q_oi.T)
    if block_size == 0:
        scale = best_s.reshape(n).astype(np.float32)
    else:
        scale = best_s if axis == 0 else np.ascontiguousarray(best_s.T)
    return Int4Weight(q_out, np.ascontiguousarray(scale, np.float32), axis, int(block_size))


def pack_int4(values: npt.ArrayLike) -> bytes:
    """ONNX INT4 storage of ``values`` (ints in ``[-8, 7]``, any shape, flattened in C order)."""
    v = np.asarray(values).reshape(-1).astype(np.int16)
    if v.size and (v.min() < -8 or v.max() > 7):
        raise ValueError("int4 values must be in [-8, 7]")
    nib = (v & 0x0F).astype(np.uint8)
    if nib.size % 2:
        nib = np.concatenate([nib, np.zeros(1, np.uint8)])
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(raw: bytes, count: int) -> npt.NDArray[np.int8]:
    """The ``count`` int4 values stored in ``raw`` (inverse of :func:`pack_int4`), as int8."""
    b = np.frombuffer(raw, np.uint8)
    if b.size != (count + 1) // 2:
        raise ValueError(f"{b.size} bytes cannot hold {count} int4 values")
    nib = np.empty(b.size * 2, np.uint8)
    nib[0::2], nib[1::2] = b & 0x0F, b >> 4
    out = nib[:count].astype(np.int8)
    return np.where(out > 7, out - 16, out).astype(np.int8)
