"""PASS / FAIL / INCONCLUSIVE of a quantized policy: an equivalence test, and the exit code of ``edgeq validate``.

A quantized policy **passes** only when the evidence shows it is equivalent to the float policy:

* **returns**: the whole 95% interval of the mean paired difference ``int8 − float`` (same seeds)
  lies inside the tolerance band. The band is ``--abs-tol`` (return units) if given, else
  ``--rel-tol`` × |float mean| (default 1%). By default it is one-sided, ``[−band, +∞)``: only a
  *loss* counts against int8, because a quantized policy that happens to score higher is not a
  deployment risk, and a two-sided rule would fail such a policy for being better. 1% is a
  convention: a loss small against what separates two training runs of the same algorithm, yet
  resolvable in tens to a couple of hundred paired episodes when quantization moves single
  episodes little (paired differences remove the seed-to-seed spread); set it for your task,
  tighten or loosen it with ``--rel-tol`` / ``--abs-tol``, ``--two-sided`` for a symmetric band;
* **failures** (falls): the paired failure-rate difference ``int8 − float`` is at most
  ``--fail-tol`` (default +2 percentage points) by the exact McNemar comparison of
  :func:`edgeq.validate.sequential.failure_interval`. The comparison applies when the failure rule
  is a declared predicate, or (default rule: a termination is a failure) once either policy has
  failed in an episode; it does not apply with ``--failure none`` or while no episode has failed.

It **fails** when the return interval lies wholly below ``−band`` or the failure-rate interval
lies wholly above ``+fail_tol``. Anything else is **INCONCLUSIVE**: too few episodes to tell, never
a pass. An interval that merely contains 0 is not evidence of equivalence (absence of evidence is
not evidence of absence); that was the rule before, and it passed policies with 41% lower returns.

Exit codes of ``edgeq validate``: :data:`EXIT_PASS` 0, :data:`EXIT_FAIL` 1, :data:`EXIT_ERROR` 2
(bad input, no target can run), :data:`EXIT_INCONCLUSIVE` 3. Every message is built from the numbers
that decided it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.validate.outcomes import FAILURE, FailureRule, outcome_counts
from edgeq.validate.sequential import (
    ALPHA,
    FAIL,
    INCONCLUSIVE,
    PASS,
    SequentialDesign,
    classify,
    failure_interval,
    failure_needed_episodes,
    fixed_design,
    mcnemar_p_value,
    mean_interval,
    needed_episodes,
)

EXIT_PASS, EXIT_FAIL, EXIT_ERROR, EXIT_INCONCLUSIVE = 0, 1, 2, 3
EXIT_CODES = {PASS: EXIT_PASS, FAIL: EXIT_FAIL, INCONCLUSIVE: EXIT_INCONCLUSIVE}
NOT_APPLICABLE = "NOT APPLICABLE"


@dataclass(frozen=True)
class Tolerance:
    """The equivalence band of the verdict (see the module docstring).

    ``relative`` × |float mean| (or ``absolute``, in return units, when set) is how much return
    int8 may lose; ``one_sided`` (default) counts only a loss; ``fail_tol`` is how much higher
    (absolute, 0.02 = 2 percentage points) int8's failure rate may be.
    """

    relative: float = 0.01
    absolute: float | None = None
    one_sided: bool = True
    fail_tol: float = 0.02

    def __post_init__(self) -> None:
        if not self.relative >= 0:
            raise EdgeqError(f"--rel-tol must be >= 0, got {self.relative}")
        if self.absolute is not None and not self.absolute >= 0:
            raise EdgeqError(f"--abs-tol must be >= 0, got {self.absolute}")
        if not 0.0 <= self.fail_tol < 1.0:
            raise EdgeqError(f"--fail-tol must be in [0, 1) (a rate difference, 0.02 = 2 points), got {self.fail_tol}")

    def band(self, float_mean: float) -> float:
        """The return loss allowed, in return units."""
        return float(self.absolute) if self.absolute is not None else self.relative * abs(float(float_mean))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tolerance:
        """From ``validation.json`` (fields this version does not know, such as the old ``ci_passes``, ignored)."""
        known = {k: data[k] for k in ("relative", "absolute", "one_sided", "fail_tol") if k in data}
        return cls(**known)

    def describe(self) -> str:
        size = f"{self.absolute:g} (absolute)" if self.absolute is not None else f"{self.relative:.2%} of |float mean|"
        side = "int8 may lose at most" if self.one_sided else "int8 may differ by at most"
        return (f"{side} {size} of return, the whole 95% interval of int8 − float inside that band; int8's failure "
                f"rate at most {100 * self.fail_tol:+.1f} percentage points above float's")


def _fmt(x: float) -> str:
    return "+∞" if x == math.inf else "−∞" if x == -math.inf else f"{x:+.4g}"


def judge_returns(float_returns: np.ndarray, int8_returns: np.ndarray, tolerance: Tolerance,
                  design: SequentialDesign) -> dict[str, Any]:
    """The return part of the verdict, with its interval, band and generated reason."""
    f = np.asarray(float_returns, np.float64)
    q = np.asarray(int8_returns, np.float64)
    iv = mean_interval(q - f, design)
    f_mean = float(f.mean()) if f.size else float("nan")
    band = tolerance.band(f_mean)
    lo, hi = iv["ci"]
    status = classify(lo, hi, band, one_sided=tolerance.one_sided)
    band_iv = [-band, math.inf if tolerance.one_sided else band]
    need = None if status != INCONCLUSIVE else needed_episodes(iv["mean"], iv["sd"], band, design,
                                                               one_sided=tolerance.one_sided)
    kind = "confidence sequence" if design.sequential else "interval"
    band_text = (f"[{_fmt(band_iv[0])}, {_fmt(band_iv[1])}]"
                 + (f" ({tolerance.absolute:g} absolute)" if tolerance.absolute is not None
                    else f" ({tolerance.relative:.2%} of |float mean| {abs(f_mean):.4g})"))
    head = (f"returns: int8 − float = {_fmt(iv['mean'])} over {iv['n']} paired episodes, "
            f"{iv['level']:.0%} {kind} [{_fmt(lo)}, {_fmt(hi)}]")
    if status == PASS:
        reason = f"{head} lies inside the band {band_text}"
    elif status == FAIL:
        edge = -band if hi < -band else band
        reason = (f"{head} lies wholly {'below' if hi < -band else 'above'} the band edge {_fmt(edge)}: "
                  f"int8 {'loses' if hi < -band else 'differs by'} more than the tolerance {band_text}")
    else:
        inside = "the lower" if lo < -band else "the upper"
        reason = f"{head} crosses {inside} edge of the band {band_text}: neither inside nor wholly beyond it"
        if need is not None:
            reason += f"; at the observed spread (sd {iv['sd']:.4g}) about {need} episodes would decide"
        elif iv["n"] >= 2:
            reason += "; at the observed mean (on the band edge) no number of episodes is expected to decide"
    return {"status": status, "mean": iv["mean"], "sd": iv["sd"], "episodes": iv["n"], "interval": [lo, hi],
            "method": iv["method"], "level": iv["level"], "band": band_iv, "band_size": band, "float_mean": f_mean,
            "needed_episodes": need, "reason": reason}


def judge_failures(float_failed: np.ndarray, int8_failed: np.ndarray, tolerance: Tolerance,
                   design: SequentialDesign, rule: FailureRule, *, alpha: float | None = None,
                   final: bool = True) -> dict[str, Any]:
    """The failure-rate part of the verdict (exact McNemar on the discordant seeds).

    ``alpha`` is the level of this look's FAIL test (default the design's α); the PASS test runs
    only when ``final`` (the last look), at the design's α (see :mod:`edgeq.validate.sequential`).
    """
    ff = np.asarray(float_failed, bool)
    qf = np.asarray(int8_failed, bool)
    n = int(ff.size)
    a = design.alpha if alpha is None else float(alpha)
    only_int8, only_float = int(np.sum(qf & ~ff)), int(np.sum(ff & ~qf))
    counts = {"float_failures": int(ff.sum()), "int8_failures": int(qf.sum()), "episodes": n,
              "only_int8": only_int8, "only_float": only_float, "fail_tol": tolerance.fail_tol, "rule": rule.spec}
    observed = f"failures: float {int(ff.sum())}/{n}, int8 {int(qf.sum())}/{n} ({rule.describe()})"
    applies = rule.spec != "none" and (rule.declared or bool(ff.any() or qf.any()))
    if not applies:
        why = ("--failure none: the task has no failures" if rule.spec == "none" else
               f"neither policy failed in {n} episodes, so failure rates are not compared (a rate below about "
               f"{min(1.0, 3.0 / max(n, 1)):.1%} may not show in {n} episodes)")
        return {**counts, "status": NOT_APPLICABLE, "applies": False, "reason": f"{observed}; {why}"}
    lo = failure_interval(only_int8, only_float, n, a)[0]
    hi = failure_interval(only_int8, only_float, n, design.alpha)[1]
    diff = (only_int8 - only_float) / max(n, 1)
    if lo > tolerance.fail_tol:
        status = FAIL
    elif hi <= tolerance.fail_tol and final:
        status = PASS
    else:
        status = INCONCLUSIVE
    p = mcnemar_p_value(only_int8, only_float)
    levels = f"level {1 - a:.4g}" if a == design.alpha else f"levels {1 - a:.4g} (this look) / {1 - design.alpha:.4g}"
    head = (f"{observed}; int8 alone failed on {only_int8} seed(s), float alone on {only_float}: rate difference "
            f"{100 * diff:+.1f} points, interval [{100 * lo:+.1f}, {100 * hi:+.1f}] at {levels} "
            f"(one-sided McNemar p = {p:.3g})")
    tol = f"{100 * tolerance.fail_tol:+.1f} points"
    if status == PASS:
        reason = f"{head}: the upper end is within {tol}"
    elif status == FAIL:
        reason = f"{head}: int8 fails more often than float by more than {tol}"
    elif hi <= tolerance.fail_tol:
        reason = (f"{head}: the upper end is within {tol}, but 'at most {tol}' is tested once, at the last look "
                  "(episode cap or time budget), to keep its level")
    else:
        reason = f"{head}: the interval crosses {tol}"
    need = None
    if status == INCONCLUSIVE:
        need = failure_needed_episodes(only_int8, only_float, n, tolerance.fail_tol, design.alpha)
        reason += (f"; about {need} episodes would decide at the observed failure rates" if need is not None else
                   "; no number of episodes is expected to decide at the observed rates")
    return {**counts, "status": status, "applies": True, "interval": [lo, hi], "rate_difference": diff,
            "alpha": a, "mcnemar_p_value": p, "needed_episodes": need, "reason": reason}


def decide(float_returns: np.ndarray, int8_returns: np.ndarray, float_failed: np.ndarray, int8_failed: np.ndarray,
           tolerance: Tolerance, design: SequentialDesign | None = None, rule: FailureRule | None = None, *,
           failure_alpha: float | None = None, final: bool = True) -> dict[str, Any]:
    """The verdict for one target from per-seed returns and failures (same seeds, same order).

    FAIL if either part FAILs; PASS if the returns PASS and the failures PASS (or do not apply);
    otherwise INCONCLUSIVE. ``failure_alpha`` is the level of this look's failure FAIL test in a
    sequential run; ``final`` says whether this is its last look (the failure PASS test runs only then).
    """
    design = design or fixed_design()
    rule = rule or FailureRule()
    ret = judge_returns(float_returns, int8_returns, tolerance, design)
    fail = judge_failures(float_failed, int8_failed, tolerance, design, rule, alpha=failure_alpha, final=final)
    parts = [ret["status"], fail["status"]]
    if FAIL in parts:
        status = FAIL
    elif ret["status"] == PASS and fail["status"] in (PASS, NOT_APPLICABLE):
        status = PASS
    else:
        status = INCONCLUSIVE
    needs = [x for x in (ret.get("needed_episodes") if ret["status"] == INCONCLUSIVE else None,
                         fail.get("needed_episodes") if fail["status"] == INCONCLUSIVE else None) if x is not None]
    return {"status": status, "passed": status == PASS, "exit_code": EXIT_CODES[status],
            "episodes": ret["episodes"], "returns": ret, "failures": fail,
            "needed_episodes": max(needs) if needs and status == INCONCLUSIVE else None,
            "reasons": [ret["reason"], fail["reason"]]}


def judge(target_result: dict[str, Any], tolerance: Tolerance, design: SequentialDesign | None = None,
          rule: FailureRule | None = None) -> dict[str, Any]:
    """The verdict of one target's JSON result (``float``/``int8`` with ``returns`` and ``outcomes``)."""
    f, q = target_result["float"], target_result["int8"]
    v = decide(np.asarray(f["returns"]), np.asarray(q["returns"]), _failed(f), _failed(q), tolerance, design, rule)
    return add_floor_text(v, target_result)


def _failed(side: dict[str, Any]) -> np.ndarray:
    if "outcomes" in side:
        return np.array([o == FAILURE for o in side["outcomes"]], dtype=bool)
    return np.asarray(side.get("terminated", [False] * len(side["returns"])), dtype=bool)


def add_floor_text(verdict: dict[str, Any], target_result: dict[str, Any]) -> dict[str, Any]:
    """Say whether int8 is distinguishable from the float rounding-noise floor (information, not the verdict)."""
    floor = target_result.get("noise_floor")
    if floor:
        verdict["distinguishable_from_floor"] = bool(floor["distinguishable"])
        lo_f, hi_f = floor["int8_minus_floor"]["ci95"]
        k = floor.get("episodes")
        on = f" on the first {k} seeds" if k else ""
        if floor["distinguishable"]:
            verdict["floor_text"] = (f"int8 is distinguishable from the float rounding-noise floor{on} "
                                     f"(int8 - floor {floor['int8_minus_floor']['mean']:+.4g}, CI [{lo_f:+.4g}, "
                                     f"{hi_f:+.4g}]; it moves single episodes {floor['spread_ratio']:.3g}x as much)")
        else:
            verdict["floor_text"] = (f"int8 is not distinguishable from the float rounding-noise floor{on} "
                                     f"(int8 - floor CI [{lo_f:+.4g}, {hi_f:+.4g}] contains 0)")
    return verdict


def overall(verdicts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """FAIL if any target FAILs, PASS only if every validated target PASSes, otherwise INCONCLUSIVE."""
    failed = [t for t, v in verdicts.items() if v["status"] == FAIL]
    undecided = [t for t, v in verdicts.items() if v["status"] == INCONCLUSIVE]
    status = FAIL if failed else INCONCLUSIVE if (undecided or not verdicts) else PASS
    return {"passed": status == PASS, "status": status, "failed_targets": failed, "inconclusive_targets": undecided,
            "exit_code": EXIT_CODES[status]}


__all__ = ["ALPHA", "EXIT_CODES", "EXIT_ERROR", "EXIT_FAIL", "EXIT_INCONCLUSIVE", "EXIT_PASS", "FAIL",
           "INCONCLUSIVE", "NOT_APPLICABLE", "PASS", "Tolerance", "add_floor_text", "decide", "judge",
           "judge_failures", "judge_returns", "overall", "outcome_counts"]
