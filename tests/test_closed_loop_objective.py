"""Closed-loop-aware objective (issue 12 part 2): the policy's Q critic weights the action error by value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from quant_helpers import mlp, stats_for

from edgeq.deploy.runtime import OrtPolicy
from edgeq.export.qdq import apply_plan
from edgeq.ingest.sb3 import load_sb3
from edgeq.ingest.sb3_critic import load_sb3_critic
from edgeq.quantizers.build import QuantOptions, build_plan
from edgeq.quantizers.sensitivity import value_loss, value_sensitivity

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "policies"


def test_sac_critic_prefers_the_actors_own_action(sac_pendulum: Path) -> None:
    critic = load_sb3_critic(sac_pendulum)
    assert critic is not None and critic.algorithm == "SAC" and len(critic.nets) == 2
    policy = load_sb3(sac_pendulum)
    rng = np.random.default_rng(0)
    obs = np.stack([np.cos(t := rng.uniform(-np.pi, np.pi, 200)), np.sin(t), rng.uniform(-8, 8, 200)], 1)
    a = OrtPolicy(policy.model.SerializeToString()).act(obs.astype(np.float32))
    q = critic(obs, a)
    # the actor was trained on this critic: its action beats a random one and its mirror image on most
    # states (SAC's Q is flat near the mode, so small moves are not a test; the values were checked
    # against stable-baselines3's own critic to 1e-4 when this was written)
    assert np.mean(q > critic(obs, rng.uniform(-2, 2, a.shape))) > 0.75
    assert np.mean(q > critic(obs, -a)) > 0.8
    assert np.all(value_loss(critic, obs, a, a) == 0.0)


def test_on_policy_archives_have_no_q_critic() -> None:
    assert load_sb3_critic(FIXTURES / "ppo-halfcheetah-vecnorm.zip") is None


def test_value_sensitivity_follows_the_critic_curvature() -> None:
    c = np.array([10.0, 1.0, 0.1])

    def critic(s: np.ndarray, a: np.ndarray) -> np.ndarray:
        return -np.sum(c * a**2, axis=1) * (1.0 + s[:, 0] ** 2)  # states with larger |s0| matter more

    rng = np.random.default_rng(1)
    s = rng.normal(size=(400, 2))
    w = value_sensitivity(critic, s, np.zeros((400, 3)), np.ones(3), eps=0.1)
    assert w.shape == (400, 3) and abs(float(w.mean()) - 1.0) < 0.05  # mean 1 (up to the floor)
    col = w.mean(axis=0)
    assert col[0] > 5 * col[1] > 5 * col[2] * 0.9
    big = np.abs(s[:, 0]) > 1.5
    assert w[big, 0].mean() > 2 * w[~big, 0].mean()


def test_critic_objective_weights_every_decision() -> None:
    rng = np.random.default_rng(0)
    dims = [5, 24, 2]
    model = mlp([(rng.normal(size=(o, i)) / np.sqrt(i), rng.normal(size=o) * 0.1)
                 for i, o in zip(dims[:-1], dims[1:], strict=True)])
    calib = (rng.normal(size=(1500, 5)) * [0.3, 1, 4, 10, 1]).astype(np.float32)
    hold = (rng.normal(size=(400, 5)) * [0.3, 1, 4, 10, 1]).astype(np.float32)
    stats = stats_for(model, calib, hold)
    ref = OrtPolicy(model.SerializeToString())

    def critic(s: np.ndarray, a: np.ndarray) -> np.ndarray:  # only action 0 matters
        return -100.0 * (a[:, 0] - ref.act(s.astype(np.float32))[:, 0]) ** 2 - 0.01 * a[:, 1] ** 2

    plain = build_plan(model, stats, QuantOptions(calibrator="max", calibrator_params={}), lower=apply_plan,
                       critic=critic)
    weighted = build_plan(model, stats, QuantOptions(calibrator="max", calibrator_params={}, objective="critic"),
                          lower=apply_plan, critic=critic)
    hp, hw = plain.metrics["heldout_action_error"], weighted.metrics["heldout_action_error"]
    assert "weighted_mean" in hp and "critic_value_loss" in plain.metrics
    assert plain.metrics["objective"] == "plain action error"
    assert "critic" in weighted.metrics["objective"]
    assert hw["score"] == pytest.approx(hw["weighted_mean"], rel=1e-9)  # the score is the weighted error
    assert hp["score"] == pytest.approx(hp["mean"], rel=1e-9)
    assert weighted.metrics["critic_value_loss"]["relative"] >= 0.0
    no_critic = build_plan(model, stats, QuantOptions(objective="critic"), lower=apply_plan)
    assert "no Q critic" in no_critic.metrics["objective"]
    with pytest.raises(ValueError, match="objective must be one of"):
        QuantOptions(objective="return")
