"""Per-layer automatic choice: it picks the candidate with the smallest held-out ACTION error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from quant_helpers import mlp, stats_for

from edgeq.calibration.calibrators import compute_amax
from edgeq.calibration.observers import TensorObserver
from edgeq.export.qdq import apply_plan
from edgeq.quantizers.auto import LayerChoice, candidate_choices, choose_per_layer
from edgeq.quantizers.build import QuantOptions, build_plan

CALIBRATORS = [("max", {}), ("percentile", {"percentile": 99.9}), ("percentile", {"percentile": 99.99}),
               ("mse", {}), ("entropy", {})]
TRANSFORMS = [("none", None), ("crossquant", 0.0), ("crossquant", 0.15), ("equalize", 0.5)]


def _case(seed: int = 0):
    """One layer whose output depends mostly on two small input channels, beside a heavy-tailed big one."""
    rng = np.random.default_rng(seed)
    n_in, n_out = 6, 3
    w = rng.normal(0, 0.05, (n_out, n_in))
    w[:, 0] = [4.0, -3.0, 2.5]  # small channel, large weight: the action depends on it
    w[:, 1] = [-2.0, 3.5, 1.0]
    b = rng.normal(0, 0.05, n_out)
    scales = np.array([0.02, 0.05, 1.0, 1.0, 1.0, 1.0])

    def states(n: int) -> np.ndarray:
        x = rng.normal(0, 1, (n, n_in)) * scales
        x[:, 5] = rng.laplace(0, 3.0, n)  # heavy tail, tiny weights: clipping it costs little
        return x.astype(np.float32)

    return mlp([(w, b)]), states(6000), states(1500)


def test_auto_picks_the_candidate_with_least_heldout_action_error() -> None:
    model, calib, held = _case()
    stats = stats_for(model, calib, held)
    auto = build_plan(model, stats, QuantOptions(auto=True, auto_calibrators=CALIBRATORS,
                                                 auto_transforms=TRANSFORMS, auto_weight_methods=[]), lower=apply_plan)
    errors: dict[str, float] = {}
    for cand in candidate_choices(CALIBRATORS, TRANSFORMS):
        plan = build_plan(model, stats, QuantOptions(calibrator=cand.calibrator, calibrator_params=dict(cand.params),
                                                     transform=cand.transform, alpha=cand.alpha), lower=apply_plan)
        errors[cand.label] = plan.metrics["heldout_action_error"]["mean"]
    best = min(errors.values())
    layer = auto.layers[0]
    assert layer.choice is not None
    chosen = layer.choice["label"]
    assert errors[chosen] == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert auto.metrics["heldout_action_error"]["mean"] == pytest.approx(best, rel=1e-9, abs=1e-12)
    # every candidate was scored and recorded, with the same numbers as independent runs
    search = layer.choice["search"]["candidates"]
    assert set(search) == set(errors)
    for label, err in search.items():
        assert err == pytest.approx(errors[label], rel=1e-4, abs=1e-7)
    # the choice is not the tensor-MSE one: per-tensor MSE calibration is far worse for the action here
    assert errors["mse"] > 2 * best
    obs = TensorObserver("x")
    obs.update(calib)
    assert compute_amax(obs, "mse") < compute_amax(obs, "max")
    # recorded for the manifest
    j = json.loads(json.dumps(auto.to_json()))
    assert j["layers"][0]["choice"]["label"] == chosen
    assert j["metrics"]["heldout_score_by_stage"]["auto"] <= j["metrics"]["heldout_score_by_stage"][
        "initial"]


def test_weight_quantizer_choice_never_raises_the_heldout_error() -> None:
    model, calib, held = _case(1)
    stats = stats_for(model, calib, held)
    acts = build_plan(model, stats, QuantOptions(auto=True, auto_calibrators=CALIBRATORS[:2],
                                                 auto_transforms=TRANSFORMS[:2], auto_weight_methods=[]),
                      lower=apply_plan)
    both = build_plan(model, stats, QuantOptions(auto=True, auto_calibrators=CALIBRATORS[:2],
                                                 auto_transforms=TRANSFORMS[:2]), lower=apply_plan)
    rec = both.layers[0].choice["search"]["weights"]
    assert set(rec["candidates"]) == {acts.layers[0].choice["label"] + " w:absmax",
                                      acts.layers[0].choice["label"] + " w:mse"}
    assert both.layers[0].weight_method == both.layers[0].choice["weight_method"]
    assert both.metrics["heldout_action_error"]["mean"] <= acts.metrics["heldout_action_error"]["mean"] + 1e-12


def test_coordinate_descent_finds_per_layer_minima_of_a_separable_score() -> None:
    cands = candidate_choices([("max", {}), ("mse", {})], [("none", None), ("crossquant", 0.5)])
    best = {"a": cands[3], "b": cands[1], "c": cands[0]}

    def score(ch) -> float:
        return sum(0.0 if ch[k].key == best[k].key else 1.0 + i for i, k in enumerate(ch))

    init = {k: LayerChoice("percentile", {"percentile": 99.99}) for k in best}
    chosen, records = choose_per_layer(list(best), init, {k: cands for k in best}, score)
    assert {k: v.key for k, v in chosen.items()} == {k: v.key for k, v in best.items()}
    assert records["c"]["heldout_action_error"] == 0.0
    assert len(records["a"]["candidates"]) == len(cands)


def test_layer_choice_validation() -> None:
    with pytest.raises(ValueError):
        LayerChoice("max", {}, "crossquant", None)
    with pytest.raises(ValueError):
        LayerChoice("max", {}, "equalize", 0.5, dynamic=True)
    assert LayerChoice("percentile", {"percentile": 99.9}, "crossquant", 0.15).label == \
        "percentile(99.9)+crossquant(alpha=0.15)"


def test_score_adds_the_tail_of_per_state_errors() -> None:
    from edgeq.quantizers.evaluate import ActionErrorScorer

    model, calib, held = _case(2)
    sc = ActionErrorScorer(model, held[:200], np.ones(3), tail_weight=0.5, tail_fraction=0.05,
                           tail_states=calib[:100], lower=apply_plan)
    e = np.abs(np.random.default_rng(0).normal(0, 0.01, (300, 3)))
    e[250, 1] = 2.0  # a calibration state with a large error: in the tail, not in the mean
    worst = np.sort(e.max(axis=1))[::-1][:15]
    assert sc.score_errors(e) == pytest.approx(e[:200].mean() + 0.5 * worst.mean())
    plain = ActionErrorScorer(model, held[:200], np.ones(3), lower=apply_plan)
    assert plain.score_errors(e[:200]) == pytest.approx(e[:200].mean())


def _three_layers(seed: int = 0):
    """obs (channels of very different ranges, as a robot's positions and velocities) -> 32 -> 32 -> 2."""
    rng = np.random.default_rng(seed)
    scales = np.array([0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 0.2, 2.0])
    layers = [(rng.normal(0, 1.0, (32, 8)) / scales, rng.normal(0, 0.1, 32)),
              (rng.normal(0, 0.3, (32, 32)), rng.normal(0, 0.1, 32)),
              (rng.normal(0, 0.3, (2, 32)), rng.normal(0, 0.1, 2))]

    def states(n: int) -> np.ndarray:
        return (rng.standard_t(4, (n, 8)) * scales).astype(np.float32)

    return mlp(layers), states(3000), states(800)


def test_first_layer_starts_keep_the_lowest_score_after_rounding() -> None:
    """auto_starts first-layer: one search per input rewrite of the first layer, the best two refined,
    the lowest held-out score kept, every start recorded; never worse than the single search here."""
    model, calib, held = _three_layers()
    stats = stats_for(model, calib, held)
    opts = {"auto": True, "rounding": "adaround", "bias_correction": True,
            "auto_transforms": [("none", None), ("crossquant", 0.0), ("crossquant", 0.5), ("equalize", 0.5)]}
    single = build_plan(model, stats, QuantOptions(**opts, auto_starts="recipe"), lower=apply_plan)
    multi = build_plan(model, stats, QuantOptions(**opts, auto_starts="first-layer"), lower=apply_plan)
    again = build_plan(model, stats, QuantOptions(**opts, auto_starts="first-layer"), lower=apply_plan)
    assert "auto_starts" not in single.metrics
    starts = multi.metrics["auto_starts"]
    assert starts["first_layer"] == multi.layers[0].node
    scores = starts["score_by_start"]
    assert len(scores) >= 2 and list(scores.values()) == sorted(scores.values())
    assert 1 <= len(starts["refined"]) <= 2 and set(starts["refined"]) <= set(scores)
    assert starts["start"] == min(starts["refined"], key=starts["refined"].get)
    final = multi.metrics["heldout_action_error"]["score"]
    assert final == pytest.approx(min(starts["refined"].values()), rel=1e-5)
    assert final <= single.metrics["heldout_action_error"]["score"] + 1e-9
    assert json.dumps(again.metrics["auto_starts"]) == json.dumps(starts)  # deterministic
    assert [la.choice["label"] for la in again.layers] == [la.choice["label"] for la in multi.layers]
    with pytest.raises(ValueError, match="auto_starts"):
        QuantOptions(auto=True, auto_starts="every-layer")
