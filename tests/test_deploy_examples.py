"""examples/robot_loop.py: the fixed-rate loop drives a real gymnasium env with a bundle.

Timing on a shared CI machine is not asserted (benchmarks/deploy_latency.py measures it); what is
checked is that the loop keeps its books straight and that pacing does not change what the robot
does: the rewards equal those of a plain, unpaced rollout with the same seeds.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
from conftest import FIXTURES

import edgeq.deploy

V1 = FIXTURES / "bundles" / "v1" / "sac-pendulum"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "robot_loop.py"


def _example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("robot_loop", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["robot_loop"] = module
    spec.loader.exec_module(module)
    return module


def _plain_rollout(policy: edgeq.deploy.DeployedPolicy, steps: int, seed: int) -> list[float]:
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=seed)
    policy.reset()
    episode, rewards = 0, []
    for _ in range(steps):
        obs, reward, terminated, truncated, _ = env.step(policy.act(obs))
        rewards.append(float(reward))
        if terminated or truncated:
            episode += 1
            obs, _ = env.reset(seed=seed + episode)
    env.close()
    return rewards


def test_paced_loop_equals_plain_rollout() -> None:
    loop = _example()
    policy = edgeq.deploy.load(V1, backend="cpu", allow_unsigned=True)
    env = gym.make("Pendulum-v1")
    rep = loop.run_loop(policy, env, rate_hz=1000.0, ticks=450, seed=3)
    env.close()
    assert rep.ticks == 450 and rep.period_us == 1000.0
    assert 0 <= rep.deadline_misses <= rep.ticks and rep.skipped_ticks >= 0
    assert len(rep.episode_returns) == 2  # Pendulum episodes last 200 steps
    for stats in (rep.act, rep.work, rep.wake_lateness):
        assert stats["median_us"] <= stats["p99_us"] <= stats["max_us"]
    assert rep.act["median_us"] <= rep.work["median_us"]
    plain = _plain_rollout(policy, 450, seed=3)
    np.testing.assert_array_equal(rep.rewards, plain)
    np.testing.assert_allclose(rep.episode_returns, [sum(plain[:200]), sum(plain[200:400])], rtol=1e-9)


def test_command_line_two_rates(capsys) -> None:  # type: ignore[no-untyped-def]
    reports = _example().main([str(V1), "--rate", "50", "--rate", "500", "--seconds", "0.2", "--backend", "cpu",
                                "--allow-unsigned"])
    assert [r["rate_hz"] for r in reports] == [50.0, 500.0]
    assert [r["ticks"] for r in reports] == [10, 100]
    out = capsys.readouterr().out
    assert "Pendulum-v1 at 50 Hz (int8 on cpu): 10 ticks" in out and "deadline misses" in out
