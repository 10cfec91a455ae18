"""The sequential procedure's error rates by simulation, and its parts against known answers (no rollouts)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.validate.outcomes import FailureRule, parse_failure
from edgeq.validate.sequential import (
    SequentialDesign,
    batches,
    cs_multiplier,
    episode_design,
    failure_interval,
    fixed_design,
    mean_interval,
    needed_episodes,
    run_until_decided,
    simulate_failures,
    simulate_returns,
    spent_alpha,
)

BAND = 10.0  # 1% of a float mean of 1000
REPS, N = 2000, 200


def _differences(kind: str, loss: float, rng: np.random.Generator) -> np.ndarray:
    """Paired differences int8 − float with mean ``-loss``: Gaussian, Student-t(3), or falls."""
    if kind == "normal":
        return -loss + rng.normal(0.0, 25.0, (REPS, N))
    if kind == "t3":
        return -loss + 25.0 / math.sqrt(3.0) * rng.standard_t(3, (REPS, N))
    # falls: each side falls on 10% of seeds independently (a fall costs 150, a large negative outlier for int8,
    # positive for float); the loss comes from int8 falling more often on top of that
    extra = loss / 150.0
    fell_int8 = rng.random((REPS, N)) < 0.10 + extra
    fell_float = rng.random((REPS, N)) < 0.10
    return rng.normal(0.0, 10.0, (REPS, N)) - 150.0 * fell_int8 + 150.0 * fell_float


@pytest.mark.parametrize("kind", ["normal", "t3", "falls"])
def test_error_rates_under_repeated_looks_stay_below_five_percent(kind: str) -> None:
    rng = np.random.default_rng({"normal": 1, "t3": 2, "falls": 3}[kind])
    design = SequentialDesign()
    no_loss = simulate_returns(_differences(kind, 0.0, rng), BAND, design)
    twice = simulate_returns(_differences(kind, 2 * BAND, rng), BAND, design)
    assert no_loss["replicates"] == REPS
    assert no_loss["fail"] <= 0.05, no_loss  # false FAIL
    assert twice["pass"] <= 0.05, twice  # false PASS
    if kind != "falls":  # the procedure also decides: most clear cases end well before the cap
        assert no_loss["pass"] > 0.9 and twice["fail"] > 0.9
        assert no_loss["mean_episodes"] < 100


def test_peeking_at_a_fixed_interval_would_break_the_error_rate() -> None:
    """Why a confidence sequence: a fixed-sample 95% t-interval looked at after every batch passes a policy that
    loses exactly the band (the worst case that must not pass) more often than its nominal 2.5%; the confidence
    sequence stays far below."""
    rng = np.random.default_rng(7)
    band = 25.0
    d = -band + rng.normal(0.0, 100.0, (REPS, N))
    naive = SequentialDesign(mode="fixed")
    # emulate peeking: the fixed design's multiplier, looked at after every batch
    sizes = np.cumsum([len(b) for b in batches(list(range(N)), SequentialDesign())])
    csum, csq = np.cumsum(d, axis=1)[:, sizes - 1], np.cumsum(d * d, axis=1)[:, sizes - 1]
    mean = csum / sizes
    sd = np.sqrt((csq - sizes * mean**2) / (sizes - 1))
    from scipy.stats import t

    lo = mean - t.ppf(0.975, sizes - 1) * sd / np.sqrt(sizes)
    hi = mean + t.ppf(0.975, sizes - 1) * sd / np.sqrt(sizes)
    decided = (lo >= -band) | (hi < -band)
    first = np.where(decided.any(axis=1), decided.argmax(axis=1), len(sizes) - 1)
    peeking_false_pass = float((lo[np.arange(REPS), first] >= -band).mean())
    sequential = simulate_returns(d, band, SequentialDesign())
    assert sequential["pass"] <= 0.025 < 0.05 < peeking_false_pass, (sequential, peeking_false_pass)
    assert naive.to_json()["returns_procedure"].startswith("Student-t")


def test_failure_comparison_error_rates_by_simulation() -> None:
    rng = np.random.default_rng(11)
    design = SequentialDesign()
    u = rng.random((REPS, N))
    same = simulate_failures(u < 0.05, (u >= 0.05) & (u < 0.10), 0.02, design)  # both fail alone on 5% of seeds
    assert same["fail"] <= 0.05
    worse = simulate_failures(u < 0.05, (u >= 0.05) & (u < 0.06), 0.02, design)  # int8 +4 points (2x fail_tol)
    assert worse["pass"] <= 0.05
    much_worse = simulate_failures(u < 0.20, np.zeros_like(u, bool), 0.02, design)  # int8 +20 points
    assert much_worse["fail"] > 0.95 and much_worse["mean_episodes"] < 80
    none = np.zeros_like(u, bool)  # no seed where only one fails: PASS, at the last look only
    assert simulate_failures(none, none, 0.02, design) == {"pass": 1.0, "fail": 0.0, "inconclusive": 0.0,
                                                         "mean_episodes": 200.0, "replicates": REPS}


def test_confidence_sequence_formula_and_intervals() -> None:
    # Waudby-Smith et al. eq. (9) at t = tune_at with alpha = 0.05: ρ²t = 2 log(1/α)·... ≈ 7.94 -> multiplier ≈ 3.03
    assert float(cs_multiplier(60, 0.05, 60)) == pytest.approx(3.03, abs=0.01)
    assert float(cs_multiplier(600, 0.05, 60)) > float(cs_multiplier(60, 0.05, 60))  # grows slowly (log)
    d = np.array([1.0, -1.0] * 20)
    seq, fix = mean_interval(d, SequentialDesign()), mean_interval(d, fixed_design())
    assert seq["ci"][0] < fix["ci"][0] < 0 < fix["ci"][1] < seq["ci"][1]
    assert fix["ci"][1] == pytest.approx(2.0227 * d.std(ddof=1) / math.sqrt(40), rel=1e-3)  # t(39) quantile
    assert mean_interval(np.zeros(5), fixed_design())["ci"] == [0.0, 0.0]
    assert mean_interval(np.ones(1), fixed_design())["ci"] == [-math.inf, math.inf]


def test_needed_episodes_is_where_the_interval_becomes_decisive() -> None:
    design = SequentialDesign()
    n = needed_episodes(-5.0, 20.0, 10.0, design)
    assert n is not None
    k = lambda m: float(cs_multiplier(m, 0.05, 60)) * 20.0 / math.sqrt(m)  # noqa: E731
    assert k(n) < 5.0 <= k(n - 1)
    assert needed_episodes(-10.0, 20.0, 10.0, design) is None  # on the band edge: never
    assert needed_episodes(-30.0, 20.0, 10.0, design) is not None  # a loss beyond the band: FAIL needs some


def test_failure_interval_uses_binomtest_exactly() -> None:
    from scipy.stats import binomtest

    lo, hi = failure_interval(8, 2, 40, 0.05)
    q = binomtest(8, 10).proportion_ci(0.95, method="exact")
    assert lo == pytest.approx(10 / 40 * (2 * q.low - 1))
    assert hi == pytest.approx(binomtest(8, 40).proportion_ci(0.95).high - binomtest(2, 40).proportion_ci(0.95).low)
    assert failure_interval(0, 0, 30, 0.05)[0] == 0.0 and failure_interval(0, 0, 30, 0.05)[1] > 0.1
    # the vectorised simulation uses the same limits
    a = np.zeros((1, 30), bool)
    a[0, :8] = True
    b = np.zeros((1, 30), bool)
    b[0, 8:10] = True
    one = simulate_failures(a, b, 0.02, fixed_design())
    lo30, hi30 = failure_interval(8, 2, 30, 0.05)
    assert (one["fail"] == 1.0) == (lo30 > 0.02) and (one["pass"] == 1.0) == (hi30 <= 0.02)


def test_batches_spending_and_the_loop() -> None:
    design = SequentialDesign(min_episodes=30, batch_episodes=10, max_episodes=60)
    assert [len(b) for b in batches(range(100), design)] == [30, 10, 10, 10]
    assert [len(b) for b in batches(range(35), design)] == [30, 5]
    assert batches(range(7), fixed_design()) == [list(range(7))]
    assert spent_alpha(60, 60) == pytest.approx(0.05) and 0 < spent_alpha(30, 60) < 0.05
    ran: list[list[int]] = []
    clock = iter(range(0, 1000, 4))
    verdict, rec = run_until_decided(list(range(200)), SequentialDesign(time_budget_s=10.0), ran.append,
                                     lambda n, a, last: {"status": "INCONCLUSIVE", "alpha": a},
                                     clock=lambda: float(next(clock)))
    assert rec.stop_reason.startswith("reached --time-budget 10 s") and [len(b) for b in ran] == [30, 10]
    verdict, rec = run_until_decided(list(range(200)), SequentialDesign(), ran.append,
                                     lambda n, a, last: {"status": "PASS" if n >= 50 else "INCONCLUSIVE"})
    assert rec.episodes == 50 and rec.stop_reason == "decided (PASS) after 50 episodes"
    with pytest.raises(EdgeqError, match="--max-episodes"):
        SequentialDesign(max_episodes=0)
    assert episode_design("auto", max_episodes=80).max_episodes == 80 and not episode_design(12).sequential
    with pytest.raises(EdgeqError, match="--episodes"):
        episode_design("many")


def test_failure_rules() -> None:
    default = FailureRule()
    assert default.outcome(True, False, 5.0, None) == "failure" and default.outcome(False, True, 5.0, None) == "timeout"
    walker = parse_failure("reward<=-100")
    assert walker.declared and not walker.needs_info
    assert walker.outcome(True, False, -100.0, None) == "failure"
    assert walker.outcome(True, False, 300.0, None) == "success"  # reached the goal
    assert walker.outcome(False, True, 1.0, None) == "timeout"
    info = parse_failure("not info.is_success")
    assert info.needs_info and info.outcome(False, True, 0.0, {"is_success": False}) == "failure"
    assert info.outcome(True, False, 0.0, {"is_success": np.True_}) == "success"
    assert parse_failure("none").outcome(True, False, -100.0, None) == "success"
    for bad in ("reward", "reward <= lots", "height<0", "info."):
        with pytest.raises(EdgeqError, match="--failure"):
            parse_failure(bad)


def test_bipedalwalker_recipe_declares_its_failures() -> None:
    from edgeq.config import QuantizeConfig

    rule = parse_failure(QuantizeConfig.from_recipe(None, env="BipedalWalker-v3").validation.failure)
    assert rule.declared and rule.outcome(True, False, -100.0, None) == "failure"
    assert rule.outcome(True, False, 0.3, None) == "success"  # the end of the course
    # default: a termination is a failure
    assert QuantizeConfig.from_recipe(None, env="HalfCheetah-v5").validation.failure is None
