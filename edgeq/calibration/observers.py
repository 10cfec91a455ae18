"""Streaming statistics of activation tensors, gathered during calibration with bounded memory.

A :class:`TensorObserver` sees an activation tensor batch after batch and keeps only what the
calibrators (:mod:`edgeq.calibration.calibrators`) and the CrossQuant-style per-channel / per-row
scales need:

* the overall ``absmax`` and the number of exact zeros,
* per-channel (per-column) ``channel_absmax`` / ``channel_min`` / ``channel_max``,
* a ``num_bins``-bin histogram of ``|x|`` over ``[0, range)``,
* a summary of the per-row absmax ``t_i`` (count, min, max, mean, std and a small histogram for
  quantiles), see :class:`RowAbsmaxStats`.

Its memory is ``O(num_bins + channels)`` whatever the number of samples.

Histogram range
---------------
The histogram range is always a power of two, the smallest one *strictly* above the largest
``|x|`` seen so far (``range = 2**e`` with ``absmax < range <= 2 * absmax``), and ``num_bins`` is a
power of two, so every bin edge ``k * range / num_bins`` is an exact binary fraction and binning a
value (``floor(|x| * num_bins / range)``, done with :func:`numpy.ldexp`) is exact. When a batch
exceeds the range, the range doubles as many times as needed and each group of ``2**d`` old bins is
summed into one new bin: a value binned at the fine level and then merged lands in exactly the bin
it would have landed in had it been binned at the coarse level directly. The final histogram
therefore depends only on the multiset of values seen, never on their order or batching: data fed
in increasing-range order, shuffled, all at once, or split over observers that are then merged give
bit-identical histograms (and so identical calibrated thresholds). The price is resolution: the data
occupies between half and all of the bins (the top bin in use is at least ``num_bins / 2``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeq.errors import BrokenFloatPolicyError

#: Largest |value| a float policy's tensor may reach on calibration observations. Real policies stay
#: many orders of magnitude below; a policy whose weights were scaled by 1e36 (or that overflowed in
#: training) exceeds it and is refused rather than quantized and "validated" against itself.
MAX_ABS_ACTIVATION = 1e12

__all__ = ["RowAbsmaxStats", "TensorObserver", "histogram_quantile"]

_FORMAT = "edgeq.tensor_observer"
_VERSION = 1

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _range_exponent(value: float) -> int:
    """Return ``e`` such that ``2**(e-1) <= value < 2**e`` (``value`` > 0, finite)."""
    _, e = math.frexp(value)
    return e


def histogram_quantile(counts: npt.ArrayLike, edges: npt.ArrayLike, q: float) -> float:
    """Return the value below which a fraction ``q`` of a histogram's mass lies.

    The mass of each bin is taken as spread uniformly over the bin, so the result is interpolated
    linearly inside the bin where the cumulative count reaches ``q * total``.

    Args:
        counts: Bin counts, shape ``[n]`` (non-negative).
        edges: Bin edges, shape ``[n + 1]`` (non-decreasing).
        q: Fraction in ``[0, 1]``.

    Returns:
        The interpolated quantile; ``edges[0]`` for an empty histogram.

    Raises:
        ValueError: If ``q`` is outside ``[0, 1]`` or the shapes do not match.
    """
    c = np.asarray(counts, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    if c.ndim != 1 or e.shape != (c.size + 1,):
        raise ValueError(f"histogram shapes do not match: counts {c.shape}, edges {e.shape}")
    if not 0.0 <= q <= 1.0 or math.isnan(q):
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    total = float(c.sum())
    if total <= 0.0:
        return float(e[0])
    cdf = np.cumsum(c)
    target = q * total
    k = int(np.searchsorted(cdf, target, side="left"))
    k = min(k, c.size - 1)
    below = float(cdf[k - 1]) if k > 0 else 0.0
    frac = (target - below) / float(c[k]) if c[k] > 0 else 0.0
    frac = min(max(frac, 0.0), 1.0)
    return float(e[k] + frac * (e[k + 1] - e[k]))


class _Pow2Histogram:
    """Histogram of non-negative values over ``[0, 2**exp)`` with a power-of-two number of bins.

    ``exp is None`` means the range is 0: only zeros have been seen, and they are all in bin 0.
    """

    def __init__(self, num_bins: int) -> None:
        if not _is_power_of_two(num_bins) or num_bins < 2:
            raise ValueError(f"num_bins must be a power of two >= 2, got {num_bins}")
        self.num_bins = num_bins
        self.log2_bins = num_bins.bit_length() - 1
        self.counts: IntArray = np.zeros(num_bins, dtype=np.int64)
        self.exp: int | None = None

    @property
    def range(self) -> float:
        return 0.0 if self.exp is None else math.ldexp(1.0, self.exp)

    def edges(self) -> FloatArray:
        if self.exp is None:
            return np.zeros(self.num_bins + 1, dtype=np.float64)
        return np.ldexp(np.arange(self.num_bins + 1, dtype=np.float64), self.exp - self.log2_bins)

    def grow_to(self, exp: int) -> None:
        """Raise the range to ``2**exp`` (no-op if it is already at least that), merging bins exactly."""
        if self.exp is None:
            # Range 0: everything seen so far is an exact zero and stays in bin 0.
            self.exp = exp
            return
        d = exp - self.exp
        if d <= 0:
            return
        n = self.num_bins
        new = np.zeros(n, dtype=np.int64)
        if d >= self.log2_bins:
            new[0] = self.counts.sum()
        else:
            f = 1 << d
            new[: n // f] = self.counts.reshape(n // f, f).sum(axis=1)
        self.counts = new
        self.exp = exp

    def update(self, a: FloatArray, amax: float) -> None:
        """Add the non-negative finite values ``a`` (1-D) whose maximum is ``amax``."""
        if a.size == 0:
            return
        if amax > 0.0:
            e = _range_exponent(amax)
            if not math.isfinite(math.ldexp(1.0, e)):
                raise ValueError(f"value {amax!r} is too large to histogram (range would overflow)")
            self.grow_to(e)
        if self.exp is None:
            self.counts[0] += a.size
            return
        idx = np.ldexp(a, self.log2_bins - self.exp).astype(np.int64)
        np.minimum(idx, self.num_bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.num_bins)

    def merge(self, other: _Pow2Histogram) -> None:
        if other.num_bins != self.num_bins:
            raise ValueError(f"cannot merge histograms of {self.num_bins} and {other.num_bins} bins")
        o_counts = other.counts
        if other.exp is not None:
            if self.exp is None or other.exp > self.exp:
                self.grow_to(other.exp)
            elif other.exp < self.exp:
                tmp = _Pow2Histogram(other.num_bins)
                tmp.counts = other.counts.copy()
                tmp.exp = other.exp
                tmp.grow_to(self.exp)
                o_counts = tmp.counts
        self.counts = self.counts + o_counts

    def to_json(self) -> dict[str, Any]:
        return {"num_bins": self.num_bins, "exp": self.exp, "counts": [int(c) for c in self.counts]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> _Pow2Histogram:
        h = cls(int(d["num_bins"]))
        counts = np.asarray(d["counts"], dtype=np.int64)
        if counts.shape != (h.num_bins,) or (counts < 0).any():
            raise ValueError(f"histogram counts must be {h.num_bins} non-negative integers")
        h.counts = counts
        h.exp = None if d["exp"] is None else int(d["exp"])
        return h


@dataclass(frozen=True)
class RowAbsmaxStats:
    """Summary of the per-row absmax ``t_i = max_j |x_ij|`` of one tensor (CrossQuant's row scale).

    ``counts`` / ``edges`` are a small histogram of ``t_i`` (same power-of-two range scheme as the
    main histogram) that :meth:`quantile` interpolates; ``min``/``max``/``mean``/``std`` are exact.
    All fields are 0 / empty-histogram when no row has been seen.
    """

    count: int
    min: float
    max: float
    mean: float
    std: float
    counts: IntArray
    edges: FloatArray

    def quantile(self, q: float) -> float:
        """Return the ``q`` quantile (``q`` in ``[0, 1]``) of ``t_i``, clamped to ``[min, max]``."""
        if self.count == 0:
            return 0.0
        v = histogram_quantile(self.counts, self.edges, q)
        return float(min(max(v, self.min), self.max))


class TensorObserver:
    """Streaming statistics of one activation tensor with bounded memory.

    Feed batches with :meth:`update`; the first axis is the batch axis and all trailing axes are
    flattened into channels (a 1-D input is a batch of scalars, one channel). Memory is
    ``O(num_bins + row_num_bins + channels)``, independent of the number of samples.

    Attributes:
        name: Tensor name (used in error messages).
        num_bins: Number of bins of the ``|x|`` histogram (a power of two, default 2048).
        count: Number of elements seen.
        samples: Number of rows (batch entries) seen.
        absmax: Largest ``|x|`` seen (0.0 before any data).
        zero_count: Number of elements exactly equal to zero.
        channel_absmax: Per-channel ``max |x|`` (CrossQuant's ``c_j``), shape ``[channels]``.
        channel_min: Per-channel minimum, shape ``[channels]``.
        channel_max: Per-channel maximum, shape ``[channels]``.

    Before the first non-empty batch the channel arrays have shape ``[0]``.
    """

    def __init__(self, name: str, num_bins: int = 2048, row_num_bins: int = 256) -> None:
        """Create an empty observer.

        Args:
            name: Tensor name, used in error messages.
            num_bins: Bins of the ``|x|`` histogram; a power of two >= 2 (2048 for the entropy method).
            row_num_bins: Bins of the per-row absmax histogram; a power of two >= 2.

        Raises:
            ValueError: If a bin count is not a power of two.
        """
        self.name = str(name)
        self._hist = _Pow2Histogram(int(num_bins))
        self._row_hist = _Pow2Histogram(int(row_num_bins))
        self.count = 0
        self.samples = 0
        self.absmax = 0.0
        self.zero_count = 0
        self.channel_absmax: FloatArray = np.zeros(0, dtype=np.float64)
        self.channel_min: FloatArray = np.zeros(0, dtype=np.float64)
        self.channel_max: FloatArray = np.zeros(0, dtype=np.float64)
        self._row_min = math.inf
        self._row_max = 0.0
        self._row_sum = 0.0
        self._row_sumsq = 0.0

    # ------------------------------------------------------------------ properties
    @property
    def num_bins(self) -> int:
        """Number of bins of the ``|x|`` histogram."""
        return self._hist.num_bins

    @property
    def row_num_bins(self) -> int:
        """Number of bins of the per-row absmax histogram."""
        return self._row_hist.num_bins

    @property
    def channels(self) -> int | None:
        """Number of channels (columns), or None before the first non-empty batch."""
        return None if self.samples == 0 else int(self.channel_absmax.size)

    @property
    def range(self) -> float:
        """Current upper end of the histogram: a power of two above ``absmax`` (0.0 if all zeros)."""
        return self._hist.range

    @property
    def nbytes(self) -> int:
        """Bytes held in numpy arrays by this observer (bounded: independent of the samples seen)."""
        arrays = (self._hist.counts, self._row_hist.counts, self.channel_absmax, self.channel_min,
                  self.channel_max)
        return int(sum(a.nbytes for a in arrays))

    @property
    def row_absmax_stats(self) -> RowAbsmaxStats:
        """Summary of the per-row absmax ``t_i`` (see :class:`RowAbsmaxStats`)."""
        n = self.samples
        if n == 0:
            return RowAbsmaxStats(0, 0.0, 0.0, 0.0, 0.0, self._row_hist.counts.copy(), self._row_hist.edges())
        mean = self._row_sum / n
        var = max(self._row_sumsq / n - mean * mean, 0.0)
        return RowAbsmaxStats(n, self._row_min, self._row_max, mean, math.sqrt(var),
                              self._row_hist.counts.copy(), self._row_hist.edges())

    # ------------------------------------------------------------------ update
    def update(self, x: npt.ArrayLike) -> None:
        """Add one batch of activations.

        Args:
            x: Array ``[batch, channels]`` or ``[batch, ...]`` (trailing axes are flattened into
                channels; a 1-D array is ``batch`` scalars). Any real dtype; computed in float64.

        Raises:
            ValueError: If the batch holds NaN or inf, is not real-valued, or its channel count
                differs from earlier batches. The message names the tensor.
        """
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiub":
            raise ValueError(
                f"tensor {self.name!r}: calibration data must be real numbers, got dtype {arr.dtype}"
            )
        if arr.ndim == 0:
            arr = arr.reshape(1, 1)
        batch = int(arr.shape[0])
        channels = int(np.prod(arr.shape[1:], dtype=np.int64)) if arr.ndim > 1 else 1
        if channels == 0:
            raise ValueError(f"tensor {self.name!r}: calibration batch of shape {arr.shape} has no channels")
        if self.samples > 0 and channels != self.channel_absmax.size:
            raise ValueError(
                f"tensor {self.name!r}: batch has {channels} channels (shape {arr.shape}), "
                f"earlier batches had {self.channel_absmax.size}"
            )
        if batch == 0:
            return
        a2 = arr.reshape(batch, channels).astype(np.float64, copy=False)
        if arr.dtype.kind == "f" and not np.isfinite(a2).all():
            n_nan = int(np.isnan(a2).sum())
            n_inf = int(np.isinf(a2).sum())
            raise BrokenFloatPolicyError(
                f"tensor {self.name!r}: calibration batch has {n_nan} NaN and {n_inf} inf values "
                f"(of {a2.size}); the float model produces non-finite activations, so it is broken in float "
                "(NaN/inf or far too large weights): fix or retrain the policy"
            )
        absx = np.abs(a2)
        if arr.dtype.kind == "f" and absx.size and float(absx.max()) > MAX_ABS_ACTIVATION:
            raise BrokenFloatPolicyError(
                f"tensor {self.name!r}: calibration values reach {float(absx.max()):.3g}, above "
                f"{MAX_ABS_ACTIVATION:g}; "
                "no working policy computes such values, so it is broken in float (far too large weights): fix "
                "or retrain the policy"
            )
        col_absmax = absx.max(axis=0)
        col_min = a2.min(axis=0)
        col_max = a2.max(axis=0)
        row_absmax = absx.max(axis=1)
        batch_absmax = float(col_absmax.max())

        if self.samples == 0:
            self.channel_absmax = col_absmax.copy()
            self.channel_min = col_min.copy()
            self.channel_max = col_max.copy()
        else:
            np.maximum(self.channel_absmax, col_absmax, out=self.channel_absmax)
            np.minimum(self.channel_min, col_min, out=self.channel_min)
            np.maximum(self.channel_max, col_max, out=self.channel_max)

        self._hist.update(absx.ravel(), batch_absmax)
        self._row_hist.update(row_absmax, batch_absmax)
        self.count += int(absx.size)
        self.samples += batch
        self.absmax = max(self.absmax, batch_absmax)
        self.zero_count += int(absx.size - np.count_nonzero(absx))
        self._row_min = min(self._row_min, float(row_absmax.min()))
        self._row_max = max(self._row_max, float(row_absmax.max()))
        self._row_sum += float(row_absmax.sum())
        self._row_sumsq += float(np.dot(row_absmax, row_absmax))

    # ------------------------------------------------------------------ queries
    def histogram(self) -> tuple[IntArray, FloatArray]:
        """Return ``(counts, edges)`` of the ``|x|`` histogram (copies).

        ``counts`` has ``num_bins`` int64 entries; ``edges`` has ``num_bins + 1`` float64 entries
        from 0 to :attr:`range`. Bin ``k`` holds ``edges[k] <= |x| < edges[k+1]``; exact zeros are
        in bin 0. If only zeros have been seen the range is 0 and all edges are 0.
        """
        return self._hist.counts.copy(), self._hist.edges()

    def row_absmax_quantile(self, q: float) -> float:
        """Return the ``q`` quantile (``q`` in ``[0, 1]``) of the per-row absmax ``t_i``."""
        return self.row_absmax_stats.quantile(q)

    # ------------------------------------------------------------------ merge / serialization
    def merge(self, other: TensorObserver) -> None:
        """Add the statistics of ``other`` (same tensor, e.g. from another process) into this one.

        The result is identical to one observer having seen both streams.

        Raises:
            ValueError: If the names, bin counts or channel counts differ.
        """
        if other.name != self.name:
            raise ValueError(f"cannot merge observer of tensor {other.name!r} into {self.name!r}")
        if other.num_bins != self.num_bins or other.row_num_bins != self.row_num_bins:
            raise ValueError(
                f"tensor {self.name!r}: cannot merge observers with different bins "
                f"({self.num_bins}/{self.row_num_bins} vs {other.num_bins}/{other.row_num_bins})"
            )
        if other.samples == 0:
            return
        if self.samples > 0 and other.channel_absmax.size != self.channel_absmax.size:
            raise ValueError(
                f"tensor {self.name!r}: cannot merge {other.channel_absmax.size} channels into "
                f"{self.channel_absmax.size}"
            )
        self._hist.merge(other._hist)
        self._row_hist.merge(other._row_hist)
        if self.samples == 0:
            self.channel_absmax = other.channel_absmax.copy()
            self.channel_min = other.channel_min.copy()
            self.channel_max = other.channel_max.copy()
        else:
            np.maximum(self.channel_absmax, other.channel_absmax, out=self.channel_absmax)
            np.minimum(self.channel_min, other.channel_min, out=self.channel_min)
            np.maximum(self.channel_max, other.channel_max, out=self.channel_max)
        self.count += other.count
        self.samples += other.samples
        self.absmax = max(self.absmax, other.absmax)
        self.zero_count += other.zero_count
        self._row_min = min(self._row_min, other._row_min)
        self._row_max = max(self._row_max, other._row_max)
        self._row_sum += other._row_sum
        self._row_sumsq += other._row_sumsq

    def to_json(self) -> dict[str, Any]:
        """Return the statistics as a JSON-serializable dict (exact: floats round-trip)."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "name": self.name,
            "count": self.count,
            "samples": self.samples,
            "absmax": self.absmax,
            "zero_count": self.zero_count,
            "channel_absmax": [float(v) for v in self.channel_absmax],
            "channel_min": [float(v) for v in self.channel_min],
            "channel_max": [float(v) for v in self.channel_max],
            "hist": self._hist.to_json(),
            "row": {
                "hist": self._row_hist.to_json(),
                "min": self._row_min if self.samples else None,
                "max": self._row_max,
                "sum": self._row_sum,
                "sumsq": self._row_sumsq,
            },
        }

    @classmethod
    def from_json(cls, d: dict[str, Any] | str) -> TensorObserver:
        """Rebuild an observer from :meth:`to_json` output (a dict or its JSON text).

        Raises:
            ValueError: If ``d`` is not a saved observer of a supported version.
        """
        data: Any = json.loads(d) if isinstance(d, str) else d
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"not saved TensorObserver statistics (expected format {_FORMAT!r})")
        if data.get("version") != _VERSION:
            raise ValueError(f"unsupported TensorObserver statistics version {data.get('version')!r}")
        try:
            hist = _Pow2Histogram.from_json(data["hist"])
            row_hist = _Pow2Histogram.from_json(data["row"]["hist"])
            obs = cls(str(data["name"]), hist.num_bins, row_hist.num_bins)
            obs._hist = hist
            obs._row_hist = row_hist
            obs.count = int(data["count"])
            obs.samples = int(data["samples"])
            obs.absmax = float(data["absmax"])
            obs.zero_count = int(data["zero_count"])
            obs.channel_absmax = np.asarray(data["channel_absmax"], dtype=np.float64)
            obs.channel_min = np.asarray(data["channel_min"], dtype=np.float64)
            obs.channel_max = np.asarray(data["channel_max"], dtype=np.float64)
            row = data["row"]
            obs._row_min = math.inf if row["min"] is None else float(row["min"])
            obs._row_max = float(row["max"])
            obs._row_sum = float(row["sum"])
            obs._row_sumsq = float(row["sumsq"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"corrupt TensorObserver statistics: {exc!r}") from exc
        n_ch = obs.channel_absmax.size
        if obs.channel_min.size != n_ch or obs.channel_max.size != n_ch:
            raise ValueError(f"tensor {obs.name!r}: saved channel statistics have mismatched lengths")
        if int(obs._hist.counts.sum()) != obs.count:
            raise ValueError(f"tensor {obs.name!r}: saved histogram does not sum to count={obs.count}")
        return obs

    def __repr__(self) -> str:
        """Return a one-line summary (name, samples, channels, absmax, range)."""
        return (f"TensorObserver(name={self.name!r}, samples={self.samples}, count={self.count}, "
                f"channels={self.channels}, absmax={self.absmax:.6g}, range={self.range:.6g})")
