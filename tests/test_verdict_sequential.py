"""The equivalence verdict end to end on pairs of policies whose loss is known in advance.

Real ONNX Runtime sessions and the real validator loop on :mod:`synthetic_pair`'s cheap env (10
steps per episode): the float policy returns 100 on every seed; a candidate's paired difference
has mean ``10·shift`` and spread ``noise·√10``; ``falls`` makes it fall on about half the seeds with
(almost) the same return.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from synthetic_pair import PairEnv, linear_policy

from edgeq.validate.outcomes import FailureRule
from edgeq.validate.sequential import SequentialDesign, fixed_design
from edgeq.validate.validator import ValidationOptions, validate_models
from edgeq.validate.verdict import EXIT_FAIL, EXIT_INCONCLUSIVE, EXIT_PASS, Tolerance

LOW, HIGH = np.full(2, -10.0), np.full(2, 10.0)


def _validate(tmp_path: Path, *, shift: float = 0.0, noise: float = 0.0, falls: bool = False,
              design: SequentialDesign | None = None, seeds: int = 200, failure: str = "terminated") -> dict:
    f = linear_policy(tmp_path / "float.onnx")
    q = linear_policy(tmp_path / "int8.onnx", shift=shift, noise=noise, falls=falls)
    opts = ValidationOptions(targets=("cpu",), floor_draws=0, sensitivity=False, per_layer=False, latency_calls=0,
                             num_envs=4, design=design or SequentialDesign(), failure=FailureRule(failure))
    return validate_models(f, q, {}, PairEnv, list(range(seeds)), env_id="PairEnv", action_low=LOW, action_high=HIGH,
                           options=opts)


def test_known_five_percent_loss_fails_and_stops_at_the_first_look(tmp_path: Path) -> None:
    val = _validate(tmp_path, shift=-0.5, noise=1.0)  # loss 5 = 5% of the float mean 100, band 1
    cpu = val["targets"]["cpu"]
    v = cpu["verdict"]
    assert v["status"] == "FAIL" and val["verdict"]["exit_code"] == EXIT_FAIL
    assert cpu["float"]["mean"] == pytest.approx(100.0)
    lo, hi = v["returns"]["interval"]
    assert hi < -1.0 and v["returns"]["band"][0] == pytest.approx(-1.0)
    assert v["returns"]["mean"] == pytest.approx(-5.0, abs=1.0)
    assert cpu["episodes"]["episodes"] == 30 and len(cpu["episodes"]["looks"]) == 1  # clear case: first look
    # the message is generated from the deciding numbers
    assert f"[{lo:+.4g}, {hi:+.4g}]" in v["reasons"][0] and "wholly below" in v["reasons"][0]


def test_zero_loss_with_enough_episodes_passes(tmp_path: Path) -> None:
    val = _validate(tmp_path, noise=0.1)
    v = val["targets"]["cpu"]["verdict"]
    assert v["status"] == "PASS" and val["verdict"]["exit_code"] == EXIT_PASS
    assert v["returns"]["interval"][0] >= -1.0
    assert v["failures"]["status"] == "NOT APPLICABLE"  # nobody fell
    assert val["targets"]["cpu"]["outcomes"]["int8"] == {"success": 0, "failure": 0, "timeout": 30}


def test_noisy_pair_with_too_few_episodes_is_inconclusive_never_pass(tmp_path: Path) -> None:
    # the mean difference is exactly what a pass needs (0), but the spread (sd ≈ 9.5) is far too wide for 5 episodes;
    # the old rule ("the CI contains 0") passed exactly this
    val = _validate(tmp_path, noise=3.0, design=fixed_design(), seeds=5)
    v = val["targets"]["cpu"]["verdict"]
    lo, hi = v["returns"]["interval"]
    assert lo < 0 < hi  # the interval contains 0 ...
    assert v["status"] == "INCONCLUSIVE" and val["verdict"]["exit_code"] == EXIT_INCONCLUSIVE  # ... and is no pass
    assert v["needed_episodes"] is not None and v["needed_episodes"] > 5
    assert f"about {v['needed_episodes']} episodes" in v["reasons"][0]


def test_falling_more_often_fails_although_the_return_is_close(tmp_path: Path) -> None:
    val = _validate(tmp_path, noise=0.1, falls=True)
    cpu = val["targets"]["cpu"]
    v = cpu["verdict"]
    assert v["returns"]["status"] == "PASS"  # same return: the falls happen at the last step
    assert v["failures"]["status"] == "FAIL" and v["status"] == "FAIL"
    fails = v["failures"]
    assert fails["float_failures"] == 0 and fails["int8_failures"] == fails["only_int8"] > 5
    assert fails["interval"][0] > 0.02
    assert cpu["outcomes"]["float"]["failure"] == 0 and cpu["outcomes"]["int8"]["failure"] == fails["int8_failures"]
    # BipedalWalker-style predicate: only a last reward <= -100 is a failure; these terminations (reward 10) are
    # successes (like reaching the goal), and the verdict follows the returns
    assert cpu["episodes"]["episodes"] == 30
    ok = _validate(tmp_path, noise=0.1, falls=True, failure="reward<=-100", design=fixed_design(), seeds=30)
    assert ok["targets"]["cpu"]["outcomes"]["int8"]["failure"] == 0
    assert ok["targets"]["cpu"]["outcomes"]["int8"]["success"] == fails["int8_failures"]
    # a declared predicate makes failures possible from the first episode: the comparison applies (0 vs 0) and
    # cannot show "at most +2 points" in 30 episodes (0 of 30 allows a rate of ~12%): undecided, never a pass
    fo = ok["targets"]["cpu"]["verdict"]["failures"]
    assert fo["applies"] and fo["status"] == "INCONCLUSIVE" and fo["interval"][1] > 0.1
    assert ok["targets"]["cpu"]["verdict"]["status"] == "INCONCLUSIVE"
    # an info key as the predicate: the env's info["fell"]
    by_info = _validate(tmp_path, noise=0.1, falls=True, failure="info.fell", design=fixed_design(), seeds=30)
    assert by_info["targets"]["cpu"]["outcomes"]["int8"]["failure"] == fails["int8_failures"]


def test_borderline_case_runs_to_the_cap_and_says_how_many_episodes_it_needs(tmp_path: Path) -> None:
    design = SequentialDesign(max_episodes=60)
    val = _validate(tmp_path, shift=-0.1, noise=1.0, design=design)  # mean loss = band: undecidable
    cpu = val["targets"]["cpu"]
    assert cpu["verdict"]["status"] == "INCONCLUSIVE" and val["verdict"]["status"] == "INCONCLUSIVE"
    assert cpu["episodes"]["episodes"] == 60 and [x["episodes"] for x in cpu["episodes"]["looks"]] == [30, 40, 50, 60]
    assert "--max-episodes 60" in cpu["episodes"]["stop_reason"]
    assert val["seeds"] == list(range(60))


def test_tolerance_band_and_old_json() -> None:
    assert Tolerance().band(-200.0) == pytest.approx(2.0)
    assert Tolerance(absolute=3.0).band(-200.0) == 3.0
    assert Tolerance.from_json({"relative": 0.02, "ci_passes": True, "one_sided": False}) == Tolerance(
        relative=0.02, one_sided=False)


def test_compare_runs_the_files_validate_runs_and_warns_on_different_sources(tmp_path: Path) -> None:
    from edgeq.validate.compare import Candidate, _file_for_target, source_warnings

    models = {"fp32": "policy.fp32.onnx", "int8": "policy.int8.onnx", "int8-cpu": "policy.int8.cpu.onnx",
              "int8-cuda": "policy.int8.cuda.onnx"}
    assert _file_for_target(models, "int8", "cpu") == "policy.int8.cpu.onnx"
    assert _file_for_target(models, "int8", "trt") == "policy.int8.onnx"
    assert _file_for_target(models, "fp32", "cpu") == "policy.fp32.onnx"

    def bundle(name: str, sha: str) -> Candidate:
        return Candidate(name, tmp_path / name / "policy.int8.cpu.onnx", {}, "bundle",
                         {"source": {"sha256": sha, "path": f"{name}.zip"}})

    assert source_warnings(bundle("a", "1" * 64), [bundle("b", "1" * 64)]) == []
    (w,) = source_warnings(bundle("a", "1" * 64), [bundle("b", "1" * 64), bundle("c", "2" * 64)])
    assert w.startswith("c was made from a different source policy than a")


def test_failure_pass_is_tested_once_at_the_cap(tmp_path: Path) -> None:
    """A task where failures are declared possible and neither policy fails: "at most +2 points" can only be shown
    at the last look (0 of 200 bounds the rate below 1.8%), so the loop runs to the cap and then PASSes."""
    val = _validate(tmp_path, noise=0.1, failure="reward<=-100")
    v = val["targets"]["cpu"]["verdict"]
    looks = val["targets"]["cpu"]["episodes"]["looks"]
    assert [x["status"] for x in looks[:-1]] == ["INCONCLUSIVE"] * (len(looks) - 1) and looks[-1]["episodes"] == 200
    assert v["status"] == "PASS" and v["failures"]["status"] == "PASS" and v["failures"]["interval"][1] <= 0.02
    capped = _validate(tmp_path, noise=0.1, failure="reward<=-100", design=SequentialDesign(max_episodes=100))
    fails = capped["targets"]["cpu"]["verdict"]["failures"]
    assert fails["status"] == "INCONCLUSIVE" and fails["needed_episodes"] is not None and fails["needed_episodes"] > 100


def test_summary_says_when_the_int8_file_is_slower_at_batch_1() -> None:
    from edgeq.validate.validator import slower_int8_note

    lat = {"latency": {"models": {"float": {"batch1": {"median_us": 10.0}}, "int8": {"batch1": {"median_us": 12.5}}}},
           "float_model": "policy.fp32.onnx", "int8_model": "policy.int8.cpu.onnx"}
    note = slower_int8_note("cpu", lat)
    assert note == ("cpu: policy.int8.cpu.onnx is slower than policy.fp32.onnx at batch 1 (median 12.5 us vs "
                    "10.0 us, 1.25x)")
    lat["latency"]["models"]["int8"]["batch1"]["median_us"] = 9.0
    assert slower_int8_note("cpu", lat) is None


def test_time_budget_stops_adding_batches(tmp_path: Path) -> None:
    val = _validate(tmp_path, shift=-0.1, noise=1.0, design=SequentialDesign(time_budget_s=1e-6))  # borderline
    cpu = val["targets"]["cpu"]
    assert cpu["episodes"]["episodes"] == 30 and cpu["verdict"]["status"] == "INCONCLUSIVE"
    assert cpu["episodes"]["stop_reason"] == "reached --time-budget 1e-06 s after 30 episodes"
    assert cpu["verdict"]["stop_reason"] == cpu["episodes"]["stop_reason"]
