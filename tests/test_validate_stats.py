"""The statistics behind the verdict, against cases with known answers (no rollouts)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.validate.noise import noise_floor, sensitivity_curve
from edgeq.validate.stats import ActionErrorAccumulator, bootstrap_ci, paired_difference
from edgeq.validate.verdict import Tolerance, judge, overall


def test_bootstrap_ci_of_constant_values_is_degenerate() -> None:
    assert bootstrap_ci(np.zeros(7)) == (0.0, 0.0)
    assert bootstrap_ci(np.full(5, -3.5)) == (-3.5, -3.5)


def test_bootstrap_ci_matches_the_normal_approximation() -> None:
    # 50 zeros and 50 ones: mean 0.5, standard error of the mean 0.5 / sqrt(100) = 0.05 (population sd)
    values = np.array([0.0, 1.0] * 50)
    lo, hi = bootstrap_ci(values, resamples=20_000)
    assert lo == pytest.approx(0.5 - 1.96 * 0.05, abs=0.012)
    assert hi == pytest.approx(0.5 + 1.96 * 0.05, abs=0.012)


def test_bootstrap_ci_is_deterministic_and_covers_the_true_mean() -> None:
    rng = np.random.default_rng(1)
    covered = 0
    trials = 200
    for k in range(trials):
        sample = rng.normal(2.0, 1.0, size=30)
        lo, hi = bootstrap_ci(sample, resamples=2000, seed=k)
        assert (lo, hi) == bootstrap_ci(sample, resamples=2000, seed=k)
        assert lo < sample.mean() < hi
        covered += lo <= 2.0 <= hi
    assert 0.88 <= covered / trials <= 0.99  # percentile bootstrap, n = 30: ~93-95 %


def test_paired_difference_of_identical_returns_is_exactly_zero() -> None:
    r = np.array([-120.5, -0.3, -240.0, -118.2])
    d = paired_difference(r, r.copy())
    assert d["mean"] == 0.0 and d["std"] == 0.0 and d["ci95"] == [0.0, 0.0]
    assert d["per_episode"] == [0.0] * 4 and d["ratio_of_means"] == 1.0


def test_paired_difference_removes_the_shared_episode_variation() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(1000, 300, size=40)  # large spread between seeds
    cand = base - 5.0 + rng.normal(0, 0.5, size=40)  # a small, consistent drop
    d = paired_difference(base, cand)
    assert d["mean"] == pytest.approx(-5.0, abs=0.3)
    assert d["ci95"][0] < -4.5 and d["ci95"][1] > -5.5 and d["ci95"][1] < 0  # tight CI that excludes 0
    assert d["relative_mean"] == pytest.approx(d["mean"] / abs(base.mean()))


def _result(float_returns: list[float], int8_returns: list[float]) -> dict:
    f, q = np.asarray(float_returns, float), np.asarray(int8_returns, float)
    return {"float": {"mean": float(f.mean()), "returns": list(f), "terminated": [False] * len(f)},
            "int8": {"returns": list(q), "terminated": [False] * len(q)},
            "paired_difference": paired_difference(f, q)}


def test_verdict_rules() -> None:
    tol = Tolerance()
    same = judge(_result([100, 200, 300], [100, 200, 300]), tol)
    assert same["status"] == "PASS" and same["returns"]["interval"] == [0.0, 0.0]
    # consistent 0.5% drop with a tight interval inside the 1% band -> PASS
    small = judge(_result([100, 200, 300, 400], [99.5, 199, 298.5, 398]), tol)
    assert small["status"] == "PASS" and small["returns"]["interval"][0] >= -2.5
    # consistent 5% drop -> FAIL, the interval wholly below -1% of the float mean
    big = judge(_result([100] * 5, [95, 95.2, 94.8, 95.1, 94.9]), tol)
    assert big["status"] == "FAIL" and big["returns"]["interval"][1] < -1.0 and big["exit_code"] == 1
    # 5% drops that vary a lot over 3 episodes: the interval reaches past the band edge -> INCONCLUSIVE
    assert judge(_result([100, 200, 300], [95, 190, 285]), tol)["status"] == "INCONCLUSIVE"
    # a noisy difference whose interval contains 0 is INCONCLUSIVE, never a pass (the old rule passed it)
    noisy = judge(_result([100, 200, 300, 400], [140, 150, 340, 350]), tol)
    lo, hi = noisy["returns"]["interval"]
    assert lo < 0 < hi and noisy["status"] == "INCONCLUSIVE" and noisy["exit_code"] == 3
    reason = noisy["reasons"][0]
    assert f"[{lo:+.4g}, {hi:+.4g}]" in reason and "neither inside nor wholly beyond" in reason
    # absolute band; one-sided (default) ignores a gain, two-sided fails it
    assert judge(_result([100] * 5, [95, 95.2, 94.8, 95.1, 94.9]), Tolerance(absolute=6.0))["status"] == "PASS"
    gain = _result([100] * 5, [105, 105.2, 104.8, 105.1, 104.9])
    assert judge(gain, Tolerance())["status"] == "PASS"
    assert judge(gain, Tolerance(one_sided=False))["status"] == "FAIL"
    assert overall({"cpu": same, "cuda": big}) == {"passed": False, "status": "FAIL", "failed_targets": ["cuda"],
                                                   "inconclusive_targets": [], "exit_code": 1}
    assert overall({"cpu": same, "cuda": noisy})["exit_code"] == 3
    assert overall({"cpu": same})["exit_code"] == 0
    with pytest.raises(EdgeqError, match="rel-tol"):
        Tolerance(relative=-0.1)
    with pytest.raises(EdgeqError, match="fail-tol"):
        Tolerance(fail_tol=1.5)


def test_noise_floor_tells_rounding_noise_from_a_real_shift() -> None:
    rng = np.random.default_rng(3)
    f = rng.normal(3000, 500, size=20)
    floor = f[None, :] + rng.normal(0, 40, size=(5, 20))  # a chaotic task: every draw moves episodes a lot
    like_floor = f + rng.normal(0, 40, size=20)
    shifted = f - 300 + rng.normal(0, 40, size=20)
    a = noise_floor(f, like_floor, floor)
    b = noise_floor(f, shifted, floor)
    assert not a["distinguishable"] and b["distinguishable"]
    assert a["spread_ratio"] == pytest.approx(1.0, abs=0.5) and b["spread_ratio"] > 4
    assert a["draws"] == 5 and len(a["per_draw_mean_difference"]) == 5
    assert a["band"][0] <= a["mean_difference"] <= a["band"][1]


def test_sensitivity_budget_interpolates_in_log_noise() -> None:
    f = np.full(4, -100.0)
    by_level = {1e-3: np.full((2, 4), -100.0), 1e-2: np.full((2, 4), -100.5), 1e-1: np.full((2, 4), -101.5)}
    s = sensitivity_curve(f, by_level, tolerance=0.01, int8_normalized_rms=0.01)
    # drop 0.5 at 1e-2, 1.5 at 1e-1; tolerance 1.0 is crossed half way in log space: 10**-1.5
    assert s["budget_sigma"] == pytest.approx(10 ** -1.5, rel=1e-9)
    assert s["int8_fraction_of_budget"] == pytest.approx(0.01 / 10 ** -1.5)
    assert [r["relative_drop"] for r in s["levels"]] == pytest.approx([0.0, 0.005, 0.015])
    assert sensitivity_curve(f, {1e-3: np.full((2, 4), -100.0)}, tolerance=0.01)["budget_sigma"] is None


def test_action_error_accumulator_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(3000, 3))
    cand = ref + rng.normal(0, [0.01, 0.1, 1.0], size=(3000, 3))
    acc = ActionErrorAccumulator(3, capacity=10_000, scale=np.array([1.0, 1.0, 2.0]))
    for i in range(0, 3000, 7):  # uneven batches, like vector envs with finished rows
        acc.add(ref[i:i + 7], cand[i:i + 7])
    s = acc.summary()
    err = np.abs(cand - ref)
    assert s["steps"] == 3000
    assert s["per_dim_mean_abs"] == pytest.approx(err.mean(axis=0))
    assert s["per_dim_max_abs"] == pytest.approx(err.max(axis=0))
    assert s["per_dim_p99_abs"] == pytest.approx(np.percentile(err, 99, axis=0))
    assert s["rms"] == pytest.approx(np.sqrt(np.mean(err ** 2)))
    assert s["p99_step_max_abs"] == pytest.approx(np.percentile(err.max(axis=1), 99))
    assert s["normalized_rms"] == pytest.approx(np.sqrt(np.mean((err / [1.0, 1.0, 2.0]) ** 2)))
