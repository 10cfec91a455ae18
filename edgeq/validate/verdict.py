"""PASS/FAIL of a quantized policy against a tolerance the user sets; the exit code of ``edgeq validate``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgeq.errors import EdgeqError

EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2


@dataclass(frozen=True)
class Tolerance:
    """When a quantized policy passes.

    It passes when its mean return is within ``relative`` × |float mean| of the float mean (or
    within ``absolute``, if set), or — with ``ci_passes`` — when the bootstrap 95% CI of the paired
    difference contains 0. With ``one_sided`` only a *lower* int8 return counts against it.
    """

    relative: float = 0.01
    absolute: float | None = None
    ci_passes: bool = True
    one_sided: bool = False

    def __post_init__(self) -> None:
        if not self.relative >= 0:
            raise EdgeqError(f"--rel-tol must be >= 0, got {self.relative}")
        if self.absolute is not None and not self.absolute >= 0:
            raise EdgeqError(f"--abs-tol must be >= 0, got {self.absolute}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        parts = [f"int8 mean within {self.relative:.2%} of float mean"]
        if self.absolute is not None:
            parts.append(f"or within {self.absolute:g} absolute")
        if self.ci_passes:
            parts.append("or paired 95% CI contains 0")
        if self.one_sided:
            parts.append("(only a lower int8 return counts)")
        return " ".join(parts)


def judge(target_result: dict[str, Any], tolerance: Tolerance) -> dict[str, Any]:
    """The verdict for one target's paired result (``float``, ``paired_difference``, ``noise_floor``)."""
    f_mean = float(target_result["float"]["mean"])
    d = target_result["paired_difference"]
    delta = float(d["mean"])
    lo, hi = d["ci95"]
    shortfall = -delta if tolerance.one_sided else abs(delta)
    rel_limit = tolerance.relative * abs(f_mean)
    within_rel = shortfall <= rel_limit
    within_abs = tolerance.absolute is not None and shortfall <= tolerance.absolute
    ci_zero = bool(lo <= 0.0 <= hi) or (tolerance.one_sided and lo >= 0.0)
    passed = bool(within_rel or within_abs or (tolerance.ci_passes and ci_zero))
    reasons = []
    if within_rel:
        reasons.append(f"|int8 - float| = {abs(delta):.4g} <= {tolerance.relative:.2%} of |float mean| "
                       f"({rel_limit:.4g})")
    if within_abs:
        reasons.append(f"within absolute tolerance {tolerance.absolute:g}")
    if tolerance.ci_passes and ci_zero:
        reasons.append(f"paired 95% CI [{lo:+.4g}, {hi:+.4g}] contains 0")
    if not passed:
        reasons.append(f"int8 - float = {delta:+.4g} ({d['relative_mean']:+.2%}), CI [{lo:+.4g}, {hi:+.4g}] "
                       f"excludes 0 and exceeds {tolerance.relative:.2%} of |float mean|")
    out: dict[str, Any] = {"passed": passed, "status": "PASS" if passed else "FAIL",
                           "within_tolerance": bool(within_rel or within_abs), "ci_contains_zero": ci_zero,
                           "reasons": reasons}
    floor = target_result.get("noise_floor")
    if floor:
        out["distinguishable_from_floor"] = bool(floor["distinguishable"])
        lo_f, hi_f = floor["int8_minus_floor"]["ci95"]
        if floor["distinguishable"]:
            out["floor_text"] = (f"int8 is distinguishable from the float rounding-noise floor "
                                 f"(int8 - floor {floor['int8_minus_floor']['mean']:+.4g}, CI [{lo_f:+.4g}, "
                                 f"{hi_f:+.4g}]; it moves single episodes {floor['spread_ratio']:.3g}x as much)")
        else:
            out["floor_text"] = (f"int8 is not distinguishable from the float rounding-noise floor "
                                 f"(int8 - floor CI [{lo_f:+.4g}, {hi_f:+.4g}] contains 0)")
    return out


def overall(verdicts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """PASS only if every validated target passes."""
    failed = [t for t, v in verdicts.items() if not v["passed"]]
    passed = not failed and bool(verdicts)
    return {"passed": passed, "status": "PASS" if passed else "FAIL", "failed_targets": failed,
            "exit_code": EXIT_PASS if passed else EXIT_FAIL}
