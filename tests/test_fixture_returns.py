"""The promise on real trained policies: the INT8 policy keeps its return (paired seeds)."""

from __future__ import annotations

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
