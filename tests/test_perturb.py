"""Disturbances (pushes, action noise), saturation counting and termination-rate intervals."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from edgeq.errors import EnvironmentSpecError
from edgeq.perturb import ActionNoiseWrapper, PushWrapper, parse_perturbation, perturbed_factory, root_push_dofs
from edgeq.validate.rates import paired_rate_difference, termination_stats, wilson_interval
from edgeq.validate.saturation import SaturationCounter, saturation_report


@pytest.mark.parametrize("env_id,dofs", [("InvertedPendulum-v5", [0]), ("Hopper-v5", [0]), ("Ant-v5", [0, 1])])
def test_root_push_dofs_are_the_horizontal_root_velocities(env_id: str, dofs: list[int]) -> None:
    env = gym.make(env_id)
    assert root_push_dofs(env.unwrapped.model) == dofs
    env.close()


def _push_log(seed: int, steps: int = 300, **kw) -> tuple[list[int], list[np.ndarray], np.ndarray]:
    env = PushWrapper(gym.make("Hopper-v5", terminate_when_unhealthy=False), **kw)
    env.reset(seed=seed)
    times, deltas, obs = [], [], None
    for t in range(steps):
        obs, _, _, _, info = env.step(np.zeros(3, np.float32))
        if "push" in info:
            times.append(t + 1)
            deltas.append(info["push"])
    env.close()
    return times, deltas, obs


def test_push_schedule_is_a_function_of_the_episode_seed() -> None:
    t1, d1, o1 = _push_log(7, speed=2.0, interval=(20, 60))
    t2, d2, o2 = _push_log(7, speed=2.0, interval=(20, 60))
    t3, _, o3 = _push_log(8, speed=2.0, interval=(20, 60))
    assert t1 == t2 and np.array_equal(np.stack(d1), np.stack(d2)) and np.array_equal(o1, o2)
    assert t1 != t3 and not np.array_equal(o1, o3)
    gaps = np.diff([0, *t1])
    assert len(t1) >= 300 // 60 and gaps.min() >= 20 and gaps.max() <= 60
    assert np.all(np.abs(np.stack(d1)) <= 2.0)


def test_a_push_adds_its_velocity_to_the_root_dof() -> None:
    plain = gym.make("InvertedPendulum-v5")
    pushed = PushWrapper(gym.make("InvertedPendulum-v5"), speed=1.0, interval=(5, 5))
    plain.reset(seed=3)
    pushed.reset(seed=3)
    a = np.zeros(1, np.float32)
    for _ in range(4):  # identical until the push
        o1, *_ = plain.step(a)
        o2, *_ = pushed.step(a)
        assert np.array_equal(o1, o2)
    # the 5th step is pushed before its physics step: kick the plain env's cart by hand, then step it
    o2, _, _, _, info = pushed.step(a)
    plain.unwrapped.data.qvel[0] += info["push"][0]
    o1, *_ = plain.step(a)
    assert abs(info["push"][0]) > 0 and np.array_equal(o1, o2)
    assert pushed.pushes == 1


def test_push_needs_mujoco_and_sane_settings() -> None:
    with pytest.raises(EnvironmentSpecError, match="MuJoCo-based env"):
        PushWrapper(gym.make("Pendulum-v1"))
    with pytest.raises(EnvironmentSpecError, match="interval"):
        PushWrapper(gym.make("Hopper-v5"), interval=(10, 5))


def test_action_noise_is_seeded_per_episode_and_clipped() -> None:
    def run(seed: int) -> np.ndarray:
        env = ActionNoiseWrapper(gym.make("Pendulum-v1"), std=0.5)
        env.reset(seed=seed)
        return np.array([env.action(np.array([1.9], np.float32))[0] for _ in range(50)])

    a, b, c = run(1), run(1), run(2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.max() <= 2.0 and a.min() >= -2.0 and a.std() > 0.3


def test_perturbation_specs_parse_and_reject_clearly() -> None:
    spec = parse_perturbation("push:speed=1.5,interval=40-120,seed=3")
    assert spec.kind == "push" and spec.params == {"speed": 1.5, "interval": (40, 120), "seed": 3}
    assert str(parse_perturbation(str(spec))) == str(spec)
    assert parse_perturbation("noise:std=0.2").kind == "action_noise"
    bad_specs = [("wind:speed=1", "unknown kind"), ("push:sped=1", "key=value"), ("push:speed=fast", "cannot read")]
    for bad, msg in bad_specs:
        with pytest.raises(EnvironmentSpecError, match=msg):
            parse_perturbation(bad)
    make = perturbed_factory(lambda: gym.make("Hopper-v5"), ["push:speed=1", "action_noise:std=0.1"])
    env = make()
    assert isinstance(env, ActionNoiseWrapper) and isinstance(env.env, PushWrapper)


def test_saturation_counter_counts_values_beyond_amax() -> None:
    c = SaturationCounter("x", amax=1.0)
    c.add(np.array([[0.5, -1.5], [1.0, 2.0]]))
    c.add(np.array([[-0.1, 0.2]]))
    assert (c.total, c.outside) == (6, 2) and c.rate == pytest.approx(2 / 6) and c.absmax == 2.0
    quiet = SaturationCounter("y", amax=3.0)
    quiet.add(np.array([1.0, -2.9]))
    report = saturation_report([c, quiet], threshold=0.1)
    assert report["max_tensor"] == "x" and len(report["warnings"]) == 1 and "'x'" in report["warnings"][0]


def test_wilson_interval_and_termination_stats() -> None:
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    stats = termination_stats(np.array([True, False, False, True]))
    assert stats["termination_rate"] == 0.5 and stats["terminations"] == 2
    d = paired_rate_difference(np.array([True, False, False, False]), np.array([True, True, True, False]))
    assert d["mean"] == 0.5 and (d["only_int8"], d["only_float"]) == (2, 0)
    assert d["ci95"][0] <= 0.5 <= d["ci95"][1]
