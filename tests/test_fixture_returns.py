"""The promise on real trained policies: the INT8 policy keeps its return (paired seeds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgeq


def test_sb3_1x_legacy_policy_quantizes_and_keeps_return(sb3_1x_ppo: Path, tmp_path: Path) -> None:
    res = edgeq.quantize(sb3_1x_ppo, "Pendulum-v1", tmp_path / "b", episodes=20, seed=0)
    cpu = res.validation["targets"]["cpu"]
    f, q = np.array(cpu["float"]["returns"]), np.array(cpu["int8"]["returns"])
    # the published RL-Zoo score is about -172 (std 104): 20 episodes put the mean within ~2.5 SE of it
    assert -172 - 60 <= f.mean() <= -172 + 60
    assert abs(q.mean() - f.mean()) <= 0.05 * abs(f.mean())


@pytest.mark.slow
def test_mujoco_fixture_int8_within_2_percent(sac_halfcheetah: Path, tmp_path: Path) -> None:
    # the default plan; of the validation extras (not read here) one noise-floor draw and no per-layer error
    res = edgeq.quantize(sac_halfcheetah, "HalfCheetah-v5", tmp_path / "b", episodes=10, seed=0,
                         overrides={"validation.floor_draws": 1, "validation.per_layer": False})
    cpu = res.validation["targets"]["cpu"]
    f, q = np.array(cpu["float"]["returns"]), np.array(cpu["int8"]["returns"])
    assert f.mean() >= 3000  # the fixture is a competent policy
    assert abs(q.mean() - f.mean()) <= 0.02 * abs(f.mean()), (f.mean(), q.mean())


def test_sac_hopper_fixture_is_a_competent_hopper() -> None:
    """The committed sac-hopper fixture loads and hops: 1000 steps on two fixed seeds, return > 2500.

    A policy that falls (td3-hopper: ~340, terminated every episode) or stands still (1 healthy reward per
    step, at most 1000) cannot reach 2500; the record says 3192.8 and 3183.6 on these seeds (SB3, torch).
    """
    import gymnasium as gym
    import onnxruntime as ort
    from conftest import POLICIES, policy_fixture

    from edgeq.ingest import load_policy

    record = json.loads((POLICIES / "sac-hopper.json").read_text())
    assert (record["algo"], record["env_id"], record["timesteps"]) == ("SAC", "Hopper-v5", 110_000)
    assert record["eval"]["mean_return"] >= 2500
    policy = load_policy(policy_fixture("sac-hopper"))
    sess = ort.InferenceSession(policy.model.SerializeToString(), providers=["CPUExecutionProvider"])
    env = gym.make("Hopper-v5")
    for k, seed in enumerate((10_000, 10_001)):
        obs, _ = env.reset(seed=seed)
        total, steps, terminated, truncated = 0.0, 0, False, False
        while not (terminated or truncated):
            act = sess.run([policy.output_name], {policy.input_name: obs[None].astype(np.float32)})[0][0]
            obs, r, terminated, truncated, _ = env.step(act)
            total += float(r)
            steps += 1
        assert steps == 1000 and not terminated, (seed, steps)  # no fall on these seeds
        assert total > 2500, (seed, total)
        assert abs(total - record["eval"]["returns"][k]) <= 0.05 * record["eval"]["returns"][k], (seed, total)
