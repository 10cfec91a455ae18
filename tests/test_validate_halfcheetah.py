"""The noise floor on a chaotic MuJoCo task (the SAC HalfCheetah-v5 fixture; two episodes, kept short).

On HalfCheetah a perturbation at float32-rounding level (1e-6 of the action range) already moves
closed-loop returns, unlike Pendulum; the floor must show that, and the trajectories of the
perturbed and the quantized policy must drift apart from float over time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import QUICK_OVERRIDES


@pytest.mark.slow
def test_halfcheetah_floor_divergence_and_per_layer(sac_halfcheetah: Path, tmp_path: Path) -> None:
    from edgeq.pipeline import quantize
    from edgeq.validate.validator import ValidationOptions

    opts = ValidationOptions.light(floor_draws=2, latency_calls=0, per_layer_states=1024)
    res = quantize(sac_halfcheetah, "HalfCheetah-v5", tmp_path / "hc", episodes=2, calib_episodes=2, num_envs=2,
                   validation=opts, report=False, overrides=QUICK_OVERRIDES)
    cpu = res.validation["targets"]["cpu"]
    fl = cpu["noise_floor"]
    float_returns = np.asarray(cpu["float"]["returns"])
    floor_returns = np.asarray(fl["returns"])
    # chaotic: 1e-6 action noise changes every episode's return (Pendulum's floor is ~1e-6 absolute)
    assert np.all(floor_returns != float_returns[None, :])
    assert fl["per_episode_rms"] > 1e-4 * np.abs(float_returns).mean()
    div = cpu["divergence"]
    assert div["steps"] == 1001 and div["median"][0] == 0.0  # same seed, same initial state
    assert div["final_median"] > 2 * div["median"][1] > 0  # int8 and float trajectories drift apart over time
    pl = res.validation["per_layer"]
    assert [r["fused"] for r in pl["layers"]] == ["Gemm+Relu", "Gemm+Relu", "Gemm+Tanh"]
    assert all(np.isfinite(r["sqnr_db"]) and 0 < r["relative_error"] < 1 for r in pl["layers"])
    assert pl["plan_reproduces_model_max_abs"] == 0.0
    assert sum(r["share"] for r in pl["ranking"]) == pytest.approx(1.0)
