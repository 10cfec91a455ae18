"""Per-channel int8 weight quantizers against direct numpy computations."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.quantizers.weights import (
    DEAD_CHANNEL_SCALE,
    WEIGHT_QUANTIZERS,
    QuantizedWeight,
    quantize_weight,
    quantize_weight_mse,
)


def _weights(shape: tuple[int, ...], seed: int, heavy: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, shape) if heavy else rng.standard_normal(shape)
    return (w * 0.1).astype(np.float32)


def _others(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis)


def _channel_sse(w: np.ndarray, qw: QuantizedWeight) -> np.ndarray:
    err = w.astype(np.float64) - qw.dequantize().astype(np.float64)
    return np.asarray(np.square(err).sum(axis=_others(w.ndim, qw.axis)), dtype=np.float64)


CASES = [((64, 32), 0), ((64, 32), 1), ((16, 8, 3, 3), 0), ((8, 16, 3, 3), 1), ((24, 40), -1)]


@pytest.mark.parametrize(("shape", "axis"), CASES)
def test_absmax_scale_and_error_bound(shape: tuple[int, ...], axis: int) -> None:
    w = _weights(shape, 1)
    qw = quantize_weight(w, axis, "absmax")
    ax = axis % w.ndim
    assert qw.axis == ax
    assert qw.q.dtype == np.int8 and qw.q.shape == w.shape
    assert qw.scale.dtype == np.float32 and qw.scale.shape == (w.shape[ax],)
    expected = (np.abs(w).max(axis=_others(w.ndim, ax)).astype(np.float64) / 127.0).astype(np.float32)
    np.testing.assert_array_equal(qw.scale, expected)
    # Nothing clipped: every element is within half a step of its reconstruction.
    shape_b = [1] * w.ndim
    shape_b[ax] = -1
    s = qw.scale.reshape(shape_b).astype(np.float64)
    err = np.abs(w.astype(np.float64) - qw.dequantize().astype(np.float64))
    assert np.all(err <= s / 2 * (1 + 1e-6))
    # The largest element of each channel maps to +-127, and the range is narrow.
    np.testing.assert_array_equal(np.abs(qw.q.astype(np.int16)).max(axis=_others(w.ndim, ax)), 127)
    assert qw.q.min() >= -127 and qw.q.max() <= 127
    # q is np.rint(w / scale) exactly.
    np.testing.assert_array_equal(qw.q, np.rint(w / qw.scale.reshape(shape_b)).astype(np.int8))


def test_round_half_to_even() -> None:
    w = np.array([[127.0, 2.5, -2.5, 1.5, 0.5, -0.5, 3.5]], dtype=np.float32)
    qw = quantize_weight(w, 0)
    assert qw.scale[0] == 1.0
    np.testing.assert_array_equal(qw.q[0], [127, 2, -2, 2, 0, 0, 4])


@pytest.mark.parametrize(("shape", "axis"), CASES)
def test_mse_never_worse_than_absmax(shape: tuple[int, ...], axis: int) -> None:
    w = _weights(shape, 2, heavy=True)
    ax = axis % w.ndim
    q_abs = quantize_weight(w, axis, "absmax")
    q_mse = quantize_weight(w, axis, "mse")
    assert q_mse.axis == ax
    assert q_mse.q.min() >= -127 and q_mse.q.max() <= 127
    sse_abs, sse_mse = _channel_sse(w, q_abs), _channel_sse(w, q_mse)
    assert np.all(sse_mse <= sse_abs)
    assert np.any(sse_mse < sse_abs)  # int8 rounding is fine: clipping pays only for some channels
    # The threshold stays in the searched grid [0.5, 1] * absmax.
    amax = np.abs(w).max(axis=_others(w.ndim, ax)).astype(np.float64)
    ratio = q_mse.scale.astype(np.float64) * 127.0 / amax
    assert np.all(ratio >= 0.5 - 1e-6) and np.all(ratio <= 1.0 + 1e-6)


def test_mse_clips_a_lone_outlier() -> None:
    # 100k values uniform in [-1, 1] plus one at 1.3: rounding error over the bulk outweighs clipping
    # the outlier, so the threshold drops to about 1 (analytic optimum of the uniform part).
    rng = np.random.default_rng(7)
    w = rng.uniform(-1.0, 1.0, (2, 100_000)).astype(np.float32)
    w[:, 0] = 1.3
    w[1] *= 0.01
    q_abs, q_mse = quantize_weight(w, 0, "absmax"), quantize_weight(w, 0, "mse")
    sse_abs, sse_mse = _channel_sse(w, q_abs), _channel_sse(w, q_mse)
    assert np.all(sse_mse < 0.75 * sse_abs)
    ratio = q_mse.scale.astype(np.float64) * 127.0 / np.abs(w).max(axis=1)
    np.testing.assert_allclose(ratio, 1.0 / 1.3, atol=0.02)


def test_mse_matches_per_channel_bruteforce() -> None:
    w = _weights((12, 50), 3, heavy=True)
    qw = quantize_weight_mse(w, 0, num_candidates=100, min_ratio=0.5)
    for c in range(w.shape[0]):
        row = w[c].astype(np.float64)
        best_err, best_scale = np.inf, None
        for r in np.linspace(0.5, 1.0, 100)[::-1]:
            s = np.float32(np.abs(w[c]).max().astype(np.float64) * r / 127.0)
            q = np.clip(np.rint(w[c] / s), -127, 127)
            err = float(np.sum((row - (q.astype(np.float32) * s).astype(np.float64)) ** 2))
            if err < best_err:
                best_err, best_scale = err, s
        assert qw.scale[c] == best_scale
        row_q = QuantizedWeight(qw.q[c : c + 1], qw.scale[c : c + 1], 0)
        assert float(_channel_sse(w[c : c + 1], row_q)[0]) == pytest.approx(best_err, rel=1e-12)


@pytest.mark.parametrize("method", sorted(WEIGHT_QUANTIZERS))
def test_dead_channels(method: str) -> None:
    w = _weights((6, 10), 4)
    w[2] = 0.0
    w[4] = 1e-40  # subnormal in float32: scale absmax/127 would underflow
    qw = quantize_weight(w, 0, method)
    assert np.all(np.isfinite(qw.scale)) and np.all(qw.scale > 0)
    assert qw.scale[2] == DEAD_CHANNEL_SCALE and qw.scale[4] == DEAD_CHANNEL_SCALE
    assert not qw.q[2].any() and not qw.q[4].any()
    assert not qw.dequantize()[2].any()
    live = quantize_weight(w[[0, 1, 3, 5]], 0, method)
    np.testing.assert_array_equal(qw.scale[[0, 1, 3, 5]], live.scale)
    all_zero = quantize_weight(np.zeros((3, 4), dtype=np.float32), 1, method)
    assert np.all(all_zero.scale == DEAD_CHANNEL_SCALE) and not all_zero.q.any()


def test_float64_and_integer_inputs() -> None:
    w64 = _weights((5, 7), 5).astype(np.float64)
    qw = quantize_weight(w64, 0)
    np.testing.assert_array_equal(qw.scale, (np.abs(w64).max(axis=1) / 127.0).astype(np.float32))
    qi = quantize_weight(np.arange(-6, 6).reshape(3, 4), 0)
    assert np.all(qi.scale > 0) and qi.q.dtype == np.int8


def test_errors() -> None:
    w = _weights((4, 5), 6)
    with pytest.raises(ValueError, match="axis"):
        quantize_weight(w, 2)
    with pytest.raises(ValueError, match="axis"):
        quantize_weight(w, -3)
    with pytest.raises(ValueError) as exc:
        quantize_weight(w, 0, "percentile")
    assert "absmax" in str(exc.value) and "mse" in str(exc.value)
    bad = w.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        quantize_weight(bad, 0)
    with pytest.raises(ValueError, match="scalar"):
        quantize_weight(np.float32(1.0), 0)
    with pytest.raises(ValueError, match="scale"):
        QuantizedWeight(np.zeros((2, 3), np.int8), np.array([1.0, 0.0], np.float32), 0)
    with pytest.raises(ValueError, match="narrow"):
        QuantizedWeight(np.full((2, 3), -128, np.int8), np.ones(2, np.float32), 0)
    with pytest.raises(ValueError, match="min_ratio"):
        quantize_weight_mse(w, 0, min_ratio=0.0)
