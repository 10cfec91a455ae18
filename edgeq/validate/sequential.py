"""How many paired episodes a verdict needs: intervals that stay valid when looked at after every batch.

Validation adds paired (float, int8) episodes in batches until the verdict is decided. Looking at an
ordinary 95% confidence interval after every batch and stopping at the first decisive one makes
wrong decisions far more often than 5% (every look is another chance to be fooled by noise). Two
procedures here stay valid under any number of looks:

* **Returns**: the *asymptotic confidence sequence* (Gaussian-mixture boundary) of Waudby-Smith,
  Arnold, Wu, Howard and Ramdas, "Time-uniform central limit theory and asymptotic confidence
  sequences", Annals of Statistics 52(6), 2024 (arXiv:2103.06476), Theorem 2.2 / eq. (9)::

      mean_t ± sd_t · sqrt( 2 (t ρ² + 1) / (t² ρ²) · log( sqrt(t ρ² + 1) / α ) )

  which covers the true mean of the paired differences at *every* episode count t at once with
  probability ≥ 1 − α (asymptotically: it needs only a finite variance, no normality). ``ρ`` sets
  the episode count where the boundary is tightest (their eq. (12): ρ² = (−2 log α +
  log(−2 log α + 1)) / t*); edgeq tunes it at :attr:`SequentialDesign.tune_at`.
* **Failure rates**: FAIL by the exact McNemar test (Clopper–Pearson limit of the share of
  discordant seeds where only int8 failed, :func:`scipy.stats.binomtest`) at a per-look level
  taken from a Lan–DeMets alpha-spending function of Pocock type, α·log(1 + (e − 1)·n/N) (Lan and
  DeMets, "Discrete sequential boundaries for clinical trials", Biometrika 70(3), 1983): the
  levels of all looks sum to at most α (a union bound), so a failure-rate increase can stop the
  loop at any look. PASS ("at most ``fail_tol`` more failures") is checked once, at the last look
  (the cap, the seeds or the time budget), with exact limits at α: showing it needs about
  150-200 episodes whatever the procedure (0 failures in n seeds bound a rate only below ~3.7/n),
  and spending α over 17 looks would push that past the 200-episode cap.

A fixed number of episodes (``--episodes N``) is one look: a Student-t 95% interval of the mean
paired difference and the exact McNemar interval at α.

No procedure sees what did not happen yet: an effect carried by rare events (a fall in 1 of 50
episodes) can be missed until such an event occurs. :attr:`SequentialDesign.min_episodes` (30)
makes an event of rate ≥ 10% appear before any decision with probability ≥ 1 − 0.9³⁰ ≈ 95.8%.
``benchmarks/sequential_error_rates.py`` measures the error rates by simulation (``BENCHMARKS.md``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from edgeq.errors import EdgeqError

#: two-sided error level of every interval (95% intervals)
ALPHA = 0.05
#: the verdict's three states and the exit codes of ``edgeq validate`` (2 is an error, e.g. a bad bundle)
PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"

CS_METHOD = "asymptotic confidence sequence (Waudby-Smith et al., Ann. Statist. 2024)"
T_METHOD = "Student-t interval (fixed number of episodes)"
MCNEMAR_METHOD = "exact McNemar test on discordant seeds (Clopper-Pearson)"
SPENDING = "Lan-DeMets Pocock-type alpha spending over looks"


@dataclass(frozen=True)
class SequentialDesign:
    """How many paired episodes validation runs.

    ``auto`` (the default): ``min_episodes`` first, then ``batch_episodes`` at a time, deciding after
    each batch with the time-uniform intervals of this module, until PASS or FAIL, or until
    ``max_episodes`` or ``time_budget_s`` (seconds of paired rollouts per target) is reached: then
    the verdict is INCONCLUSIVE. ``fixed``: exactly the seeds given, one look.
    """

    mode: str = "auto"
    alpha: float = ALPHA
    min_episodes: int = 30
    batch_episodes: int = 10
    max_episodes: int = 200
    time_budget_s: float | None = None
    tune_at: int = 60

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "fixed"):
            raise EdgeqError(f"episodes mode {self.mode!r}; expected 'auto' or 'fixed'")
        if not 0.0 < self.alpha < 0.5:
            raise EdgeqError(f"alpha must be in (0, 0.5), got {self.alpha}")
        if self.min_episodes < 2:
            raise EdgeqError(f"--min-episodes must be >= 2, got {self.min_episodes}")
        if self.batch_episodes < 1:
            raise EdgeqError(f"--batch-episodes must be >= 1, got {self.batch_episodes}")
        if self.max_episodes < 1:
            raise EdgeqError(f"--max-episodes must be >= 1, got {self.max_episodes}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise EdgeqError(f"--time-budget must be > 0 seconds, got {self.time_budget_s}")
        if self.tune_at < 1:
            raise EdgeqError(f"tune_at must be >= 1, got {self.tune_at}")

    @property
    def sequential(self) -> bool:
        return self.mode == "auto"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = asdict(self)
        if self.sequential:
            d["returns_procedure"] = CS_METHOD
            d["failures_procedure"] = f"{MCNEMAR_METHOD}, {SPENDING}"
        else:
            d["returns_procedure"] = T_METHOD
            d["failures_procedure"] = MCNEMAR_METHOD
        return d


def fixed_design(alpha: float = ALPHA) -> SequentialDesign:
    """One look at all the given seeds (``--episodes N`` / ``--seeds``)."""
    return SequentialDesign(mode="fixed", alpha=alpha)


def episode_design(episodes: int | str, *, max_episodes: int = 200, time_budget: float | None = None,
                   min_episodes: int | None = None) -> SequentialDesign:
    """``"auto"`` → the sequential design with these caps; an integer N → N episodes, one look."""
    if isinstance(episodes, str) and episodes.strip().lower() == "auto":
        base = SequentialDesign(max_episodes=max_episodes, time_budget_s=time_budget)
        return base if min_episodes is None else replace(base, min_episodes=min_episodes)
    try:
        n = int(episodes)
    except (TypeError, ValueError):
        raise EdgeqError(f"--episodes {episodes!r}: expected 'auto' or a positive integer") from None
    if n < 1:
        raise EdgeqError(f"--episodes must be >= 1 or 'auto', got {n}")
    return fixed_design()


# ---------------------------------------------------------------------------------------------------
# intervals of the mean paired return difference


def cs_rho(tune_at: float, alpha: float = ALPHA) -> float:
    """ρ of the Gaussian-mixture boundary that is tightest at ``tune_at`` episodes (Waudby-Smith et al. eq. 12)."""
    la = -2.0 * math.log(alpha)
    return math.sqrt((la + math.log(la + 1.0)) / float(tune_at))


def cs_multiplier(t: np.ndarray | float, alpha: float = ALPHA, tune_at: float = 60) -> np.ndarray:
    """The confidence sequence's half-width over ``sd / sqrt(t)`` at ``t`` episodes (1.96 would be a fixed CI)."""
    t = np.asarray(t, np.float64)
    r2 = cs_rho(tune_at, alpha) ** 2
    tr = t * r2
    return np.asarray(np.sqrt(2.0 * (tr + 1.0) / tr * np.log(np.sqrt(tr + 1.0) / alpha)))


def t_multiplier(t: np.ndarray | float, alpha: float = ALPHA) -> np.ndarray:
    """Student-t two-sided quantile with ``t - 1`` degrees of freedom."""
    from scipy.stats import t as student_t

    t = np.asarray(t, np.float64)
    return np.asarray(student_t.ppf(1.0 - alpha / 2.0, np.maximum(t - 1.0, 1.0)))


def mean_interval(differences: np.ndarray, design: SequentialDesign) -> dict[str, Any]:
    """The interval of the mean paired difference the verdict uses, for ``design``.

    Returns ``{"mean", "sd", "n", "ci", "method", "level"}``; with fewer than 2 episodes the interval
    is unbounded.
    """
    d = np.asarray(differences, np.float64)
    n = int(d.size)
    mean = float(d.mean()) if n else float("nan")
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    if n < 2:
        lo, hi = -math.inf, math.inf
    else:
        k = float(cs_multiplier(n, design.alpha, design.tune_at) if design.sequential
                  else t_multiplier(n, design.alpha))
        half = k * sd / math.sqrt(n)
        lo, hi = mean - half, mean + half
    return {"mean": mean, "sd": sd, "n": n, "ci": [lo, hi],
            "method": CS_METHOD if design.sequential else T_METHOD, "level": 1.0 - design.alpha}


def classify(lo: float, hi: float, band: float, *, one_sided: bool = True) -> str:
    """PASS when the whole interval lies inside the band, FAIL when wholly beyond it on a losing side.

    One-sided, the band is ``[-band, +inf)`` (only a loss counts); two-sided ``[-band, +band]``.
    """
    if lo >= -band and (one_sided or hi <= band):
        return PASS
    if hi < -band or (not one_sided and lo > band):
        return FAIL
    return INCONCLUSIVE


def needed_episodes(mean: float, sd: float, band: float, design: SequentialDesign, *, one_sided: bool = True,
                    limit: int = 10_000_000) -> int | None:
    """Episodes at which the interval (at the observed mean and spread) would be decisive; None if never.

    The mean sitting exactly on a band edge (or a spread of 0 that is still undecided) never decides.
    """
    if not (math.isfinite(mean) and math.isfinite(sd)) or sd <= 0:
        return None
    gaps = [mean + band] if mean >= -band else [-band - mean]
    if not one_sided:
        gaps = [min(mean + band, band - mean)] if -band <= mean <= band else [abs(mean) - band]
    gap = gaps[0]
    if gap <= 0:
        return None

    def decisive(n: int) -> bool:
        k = float(cs_multiplier(n, design.alpha, design.tune_at) if design.sequential
                  else t_multiplier(n, design.alpha))
        return k * sd / math.sqrt(n) < gap

    lo, hi = 2, 2
    while not decisive(hi):
        lo, hi = hi, hi * 2
        if hi > limit:
            return None
    while lo < hi:
        mid = (lo + hi) // 2
        if decisive(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


# ---------------------------------------------------------------------------------------------------
# failure rates: exact McNemar on the discordant seeds


def spent_alpha(n: int, n_max: int, alpha: float = ALPHA) -> float:
    """Pocock-type Lan–DeMets spending: the share of ``alpha`` usable up to ``n`` of ``n_max`` episodes."""
    frac = min(max(n / max(n_max, 1), 0.0), 1.0)
    return alpha * math.log(1.0 + (math.e - 1.0) * frac)


def _cp(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Clopper–Pearson (exact) two-sided ``1 - alpha`` interval of a binomial proportion, via ``binomtest``."""
    from scipy.stats import binomtest

    ci = binomtest(k, n, 0.5).proportion_ci(confidence_level=1.0 - alpha, method="exact")
    return float(ci.low), float(ci.high)


def failure_interval(only_int8: int, only_float: int, n: int, alpha: float = ALPHA) -> list[float]:
    """Interval ``[lower, upper]`` of the paired failure-rate difference ``int8 - float`` on ``n`` seeds.

    * ``lower`` (decides FAIL) is the exact McNemar bound: conditional on the ``m = only_int8 +
      only_float`` discordant seeds, ``only_int8`` is Binomial(m, q); the Clopper–Pearson lower limit
      of q (``scipy.stats.binomtest``) maps to ``m / n · (2q − 1)``. No discordant seed: 0.
    * ``upper`` (decides PASS) does not condition on how many seeds were discordant, because "no
      seed disagreed in 20" does not show that fewer than 2% of seeds would: it is the exact upper
      limit of the int8-only rate minus the exact lower limit of the float-only rate (each at
      ``alpha / 2``, so the two limits hold together with probability ≥ 1 − alpha).
    """
    if n <= 0:
        return [-1.0, 1.0]
    m = only_int8 + only_float
    lower = 0.0 if m == 0 else m / n * (2.0 * _cp(only_int8, m, alpha)[0] - 1.0)
    upper = _cp(only_int8, n, alpha)[1] - _cp(only_float, n, alpha)[0]
    return [lower, upper]


def mcnemar_p_value(only_int8: int, only_float: int) -> float:
    """One-sided exact McNemar p-value for "int8 fails more often" (1.0 with no discordant seed)."""
    m = only_int8 + only_float
    if m == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(only_int8, m, 0.5, alternative="greater").pvalue)


def failure_needed_episodes(only_int8: int, only_float: int, n: int, fail_tol: float, alpha: float,
                            limit: int = 1_000_000) -> int | None:
    """Episodes at which the failure comparison would decide if discordance kept its observed rates."""
    if n <= 0:
        return None
    rate_i, rate_f = only_int8 / n, only_float / n
    if rate_i - rate_f == fail_tol:
        return None

    def decided(k: int) -> bool:
        lo, hi = failure_interval(round(rate_i * k), round(rate_f * k), k, alpha)
        return hi <= fail_tol or lo > fail_tol

    k = max(n, 2)
    while k <= limit:
        if decided(k):
            return k
        k = int(k * 1.25) + 1
    return None


# ---------------------------------------------------------------------------------------------------
# the batch loop


@dataclass
class LoopRecord:
    """What the loop did: the looks (episodes, status), why it stopped and the time spent."""

    looks: list[dict[str, Any]]
    stop_reason: str
    episodes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"looks": self.looks, "stop_reason": self.stop_reason, "episodes": self.episodes,
                "seconds": round(self.seconds, 3)}


def batches(seeds: Sequence[int], design: SequentialDesign) -> list[list[int]]:
    """The seed batches the loop may run, in order: ``min_episodes`` first, then ``batch_episodes`` each."""
    seeds = [int(s) for s in seeds]
    if not design.sequential:
        return [seeds]
    cap = min(len(seeds), design.max_episodes)
    out, start = [], 0
    size = min(design.min_episodes, cap)
    while start < cap:
        out.append(seeds[start:start + size])
        start += size
        size = min(design.batch_episodes, cap - start)
    return out


def run_until_decided(seeds: Sequence[int], design: SequentialDesign,
                      run_batch: Callable[[list[int]], None],
                      decide: Callable[[int, float, bool], dict[str, Any]],
                      clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, Any], LoopRecord]:
    """Run ``run_batch`` on successive seed batches, calling ``decide`` after each, until it is decided.

    ``run_batch(seeds)`` produces (and keeps, wherever the caller wants) the paired episodes of
    those seeds; any ``run_episodes``-like function works, serial or spread over workers.
    ``decide(episodes_so_far, failure_alpha, final)`` returns a verdict dict with ``status``; it is
    called with the level of this look's failure FAIL test (the alpha spent since the previous look)
    and ``final``, true at the last look (cap, seeds or time budget reached; always for a fixed
    design), the one look where the failure comparison may PASS.
    Returns the last verdict and the :class:`LoopRecord`.
    """
    plan = batches(seeds, design)
    if not plan or not plan[0]:
        raise EdgeqError("validation needs at least one episode (--episodes >= 1, or --max-episodes >= 1)")
    n_max = sum(len(b) for b in plan)
    t0 = clock()
    n, spent = 0, 0.0
    looks: list[dict[str, Any]] = []
    verdict: dict[str, Any] = {}
    reason = "fixed number of episodes"
    for i, batch in enumerate(plan):
        run_batch(batch)
        n += len(batch)
        over_budget = design.time_budget_s is not None and clock() - t0 >= design.time_budget_s
        final = not design.sequential or i == len(plan) - 1 or over_budget
        if design.sequential:
            total = spent_alpha(n, n_max, design.alpha)
            fail_alpha, spent = max(total - spent, 1e-12), total  # binomtest needs a level below 1
        else:
            fail_alpha = design.alpha
        verdict = decide(n, fail_alpha, final)
        look = {"episodes": n, "status": verdict["status"], "seconds": round(clock() - t0, 3)}
        if "interval" in verdict.get("returns", {}):
            look["interval"] = verdict["returns"]["interval"]
        looks.append(look)
        if not design.sequential:
            break
        if verdict["status"] in (PASS, FAIL):
            reason = f"decided ({verdict['status']}) after {n} episodes"
            break
        if i == len(plan) - 1:
            reason = (f"reached --max-episodes {design.max_episodes}" if n >= design.max_episodes
                      else f"ran out of seeds ({n} given)")
            break
        if over_budget:
            reason = f"reached --time-budget {design.time_budget_s:g} s after {n} episodes"
            break
    return verdict, LoopRecord(looks, reason, n, clock() - t0)


# ---------------------------------------------------------------------------------------------------
# simulation of the error rates (vectorised; used by tests and benchmarks/sequential_error_rates.py)


def simulate_returns(differences: np.ndarray, band: float, design: SequentialDesign, *,
                     one_sided: bool = True) -> dict[str, Any]:
    """Run the return decision of ``design`` on simulated paired differences ``[replicates, max_episodes]``.

    Each row is one validation; returns the share of rows that end PASS, FAIL and INCONCLUSIVE and
    the episodes used (mean), looking after every batch exactly as :func:`run_until_decided` does.
    """
    d = np.asarray(differences, np.float64)
    reps, n_max = d.shape
    sizes = [len(b) for b in batches(list(range(n_max)), design)]
    ns = np.cumsum(sizes)
    csum, csq = np.cumsum(d, axis=1), np.cumsum(d * d, axis=1)
    idx = ns - 1
    mean = csum[:, idx] / ns
    var = np.maximum((csq[:, idx] - ns * mean * mean) / np.maximum(ns - 1, 1), 0.0)
    k = cs_multiplier(ns, design.alpha, design.tune_at) if design.sequential else t_multiplier(ns, design.alpha)
    half = k * np.sqrt(var / ns)
    lo, hi = mean - half, mean + half
    passed = (lo >= -band) & (True if one_sided else hi <= band)
    failed = (hi < -band) | (False if one_sided else lo > band)
    decided = passed | failed
    first = np.where(decided.any(axis=1), decided.argmax(axis=1), len(ns) - 1)
    rows = np.arange(reps)
    p, f = passed[rows, first], failed[rows, first]
    return {"pass": float(p.mean()), "fail": float(f.mean()), "inconclusive": float((~p & ~f).mean()),
            "mean_episodes": float(ns[first].mean()), "replicates": int(reps)}


def simulate_failures(only_int8: np.ndarray, only_float: np.ndarray, fail_tol: float,
                      design: SequentialDesign) -> dict[str, Any]:
    """The failure decision on simulated discordance indicators ``[replicates, max_episodes]`` (bool).

    Vectorised Clopper–Pearson limits (the same interval :func:`failure_interval` takes from
    ``scipy.stats.binomtest``) at the per-look alpha of the spending function. Every row is taken
    to be a task where failures happen (the comparison applies from the first look).
    """
    from scipy.stats import beta

    a, b = np.asarray(only_int8, bool), np.asarray(only_float, bool)
    reps, n_max = a.shape
    sizes = [len(x) for x in batches(list(range(n_max)), design)]
    ns = np.cumsum(sizes)
    ca, cb = np.cumsum(a, axis=1)[:, ns - 1], np.cumsum(b, axis=1)[:, ns - 1]
    if design.sequential:
        spent = np.array([spent_alpha(int(n), int(ns[-1]), design.alpha) for n in ns])
        alphas = np.diff(np.concatenate([[0.0], spent]))
    else:
        alphas = np.full(len(ns), design.alpha)
    m = ca + cb
    al = np.broadcast_to(alphas, m.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        q_lo = np.where(ca > 0, beta.ppf(al / 2, np.maximum(ca, 1), np.maximum(m - ca + 1, 1)), 0.0)
    lo = np.where(m > 0, m / ns * (2 * q_lo - 1), 0.0)
    # PASS is checked once, at the last look, with the full alpha
    n_last, a_last, b_last = ns[-1], ca[:, -1], cb[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        up = np.where(a_last < n_last, beta.ppf(1 - design.alpha / 2, a_last + 1, np.maximum(n_last - a_last, 1)),
                      1.0)
        dn = np.where(b_last > 0, beta.ppf(design.alpha / 2, np.maximum(b_last, 1), n_last - b_last + 1), 0.0)
    hi = np.full(m.shape, np.inf)
    hi[:, -1] = up - dn
    passed, failed = hi <= fail_tol, lo > fail_tol
    decided = passed | failed
    first = np.where(decided.any(axis=1), decided.argmax(axis=1), len(ns) - 1)
    rows = np.arange(reps)
    p, f = passed[rows, first], failed[rows, first]
    return {"pass": float(p.mean()), "fail": float(f.mean()), "inconclusive": float((~p & ~f).mean()),
            "mean_episodes": float(ns[first].mean()), "replicates": int(reps)}
