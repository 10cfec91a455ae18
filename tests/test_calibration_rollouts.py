"""Calibration rollouts: bounded memory, exploration noise, reservoir, offline observations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeq.calibration.collect import (
    ExplorationNoise,
    ObservationReservoir,
    calibrate_observations,
    calibrate_rollouts,
    calibration_tensors,
)
from edgeq.envs import env_factory
from edgeq.ingest.sb3 import load_sb3


@pytest.fixture(scope="module")
def policy(sac_pendulum: Path):
    return load_sb3(sac_pendulum)


def _nbytes(stats) -> int:
    return sum(o.nbytes for o in stats.observers.values()) + stats.observations.nbytes


def test_memory_does_not_grow_with_steps(policy) -> None:
    small = calibrate_rollouts(policy, env_factory("Pendulum-v1"), [1, 2], reservoir_size=256)
    large = calibrate_rollouts(policy, env_factory("Pendulum-v1"), list(range(1, 13)), reservoir_size=256)
    assert large.steps == 6 * small.steps == 12 * 200
    assert _nbytes(large) == _nbytes(small)
    assert all(large.observers[t].count == 6 * small.observers[t].count for t in small.observers)


def test_observes_every_weighted_layer_input(policy) -> None:
    tensors = calibration_tensors(policy.model)
    assert tensors == ["obs", "act1", "act2"]
    stats = calibrate_rollouts(policy, env_factory("Pendulum-v1"), [5])
    assert set(stats.observers) == set(tensors)
    assert stats.observers["obs"].channel_absmax.shape == (3,)
    assert stats.observers["act1"].channel_absmax.shape == (256,)
    # post-ReLU tensors are non-negative
    assert stats.observers["act1"].channel_min.min() >= 0.0


def test_exploration_noise_visits_other_states(policy) -> None:
    env = env_factory("Pendulum-v1")
    plain = calibrate_rollouts(policy, env, [3], noise=ExplorationNoise())
    noisy = calibrate_rollouts(policy, env, [3], noise=ExplorationNoise(gaussian=0.3, epsilon=0.1))
    assert not np.allclose(plain.observations, noisy.observations)
    assert plain.settings["noise"] == {"gaussian": 0.0, "epsilon": 0.0}
    # same seed and noise settings: identical statistics
    again = calibrate_rollouts(policy, env, [3], noise=ExplorationNoise(gaussian=0.3, epsilon=0.1))
    assert noisy.observers["act2"].to_json() == again.observers["act2"].to_json()


def test_noise_respects_action_bounds() -> None:
    perturb = ExplorationNoise(gaussian=5.0, epsilon=0.5).make(np.array([-2.0]), np.array([2.0]))
    assert perturb is not None
    out = perturb(np.zeros((1000, 1), np.float32), np.random.default_rng(0))
    assert out.min() >= -2.0 and out.max() <= 2.0 and out.std() > 1.0


def test_reservoir_is_uniform_and_bounded() -> None:
    res = ObservationReservoir(100, 1, seed=0)
    res.add(np.arange(10_000, dtype=np.float32)[:, None])
    sample = res.sample()
    assert sample.shape == (100, 1) and res.seen == 10_000
    assert 3000 < sample.mean() < 7000  # a uniform sample of 0..9999, not the first 100


def test_offline_observations(policy) -> None:
    obs = np.random.default_rng(0).uniform([-1, -1, -8], [1, 1, 8], (1000, 3))
    stats = calibrate_observations(policy, obs, batch_size=64)
    assert stats.steps == 1000 and stats.observers["obs"].samples == 1000
    assert stats.observers["obs"].absmax == pytest.approx(np.abs(obs).max(), rel=1e-6)
    with pytest.raises(Exception, match="4 features; the policy expects 3"):
        calibrate_observations(policy, np.zeros((10, 4)))
