"""Smoke test of ``benchmarks/calibration_table.py`` on the SAC Pendulum fixture (2 paired episodes).

What must hold for the benchmark's table to mean anything:

* ONNX Runtime's quantizer is calibrated on exactly the states edgeq's calibration visits;
* edgeq and ONNX Runtime rows of one fixture share the float rollouts (same seeds, same float
  graph), so their float returns are identical;
* ``edgeq check`` finds no TensorRT error in edgeq's graph and finds ORT's default int32 bias;
* "kept" is 1 + mean(int8 − float) / |mean(float)|;
* the headline rows come first in the results file.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("calibration_table", ROOT / "benchmarks" / "calibration_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["calibration_table"] = module
    spec.loader.exec_module(module)
    return module


def test_equal_batches_split_every_row(bench: ModuleType) -> None:
    assert bench.equal_batch(4000) == 250
    assert bench.equal_batch(10_000) == 250
    assert bench.equal_batch(100) == 100
    assert bench.equal_batch(9973) == 1  # a prime: batch 1, no row dropped


def test_ort_calibrates_on_the_states_edgeq_calibrates_on(bench: ModuleType) -> None:
    from edgeq.calibration.collect import ExplorationNoise, calibrate_rollouts
    from edgeq.config import QuantizeConfig

    fx = bench.FIXTURES["sac-pendulum"]
    fp, make_env, ep_len = bench.bound_policy(fx)
    config = QuantizeConfig.from_recipe(None, env=fx.env).with_overrides(
        {"calibration.episodes": 3, "calibration.holdout_episodes": 2})
    states = bench.calibration_states(fp, make_env, config)
    recipe = config.calibration
    seeds = list(range(recipe.seed, recipe.seed + recipe.episodes))
    held = list(range(recipe.seed + 3, recipe.seed + 5))
    big = 10 * ep_len * recipe.episodes
    stats = calibrate_rollouts(fp, make_env, seeds, noise=ExplorationNoise(**recipe.exploration.to_dict()),
                               num_envs=recipe.num_envs, reservoir_size=big, holdout_seeds=held, holdout_size=big)
    assert states.shape == (5 * ep_len, fp.obs_space.size)
    # reservoirs larger than the stream keep every row in order: the same states, calibration then held-out
    assert stats.holdout is not None
    np.testing.assert_array_equal(states, np.concatenate([stats.observations, stats.holdout]))


def test_rows_share_float_rollouts_and_count_trt_errors(bench: ModuleType, tmp_path: Path) -> None:
    fx = bench.FIXTURES["sac-pendulum"]
    configs = {c.name: c for c in bench.all_configs()}
    rows = {name: bench.run_row(fx, configs[name], 2, tmp_path / str(i), num_envs=2)
            for i, name in enumerate(("max / w-absmax", "ORT default", "ORT TensorRT-style"))}
    for name, r in rows.items():
        assert "error" not in r and "skipped" not in r, (name, r.get("error") or r.get("skipped"))
        assert r["episodes"] == 2 and len(r["int8_returns"]) == 2
        assert r["kept"] == pytest.approx(1 + (r["int8_mean"] - r["float_mean"]) / abs(r["float_mean"]))
        # calibration/Pendulum-v1.yaml: 20 calibration + 5 held-out episodes of 200 steps (ORT calibrates on both)
        assert r["calibration_steps"] == (20 if r["kind"] == "edgeq" else 25) * 200
        m = r["memory"]
        assert m["peak_rss_mib"] >= m["rss_at_start_mib"] > 0
    floats = {name: r["float_returns"] for name, r in rows.items()}
    assert floats["ORT default"] == floats["max / w-absmax"] == floats["ORT TensorRT-style"]
    assert rows["max / w-absmax"]["check"]["errors"] == 0
    assert rows["ORT TensorRT-style"]["check"]["errors"] == 0
    assert "error:int32-bias" in rows["ORT default"]["check"]["rules"]

    text = bench.markdown(list(rows.values()), "cmd", 2)
    headline = text.index("## Headline")
    assert headline < text.index("## Overview") < text.index("## Configurations") < text.index("## sac-pendulum")
    head_block = text[headline:text.index("## Overview")]
    assert "ORT default" in head_block and "ORT TensorRT-style" in head_block
    assert "max / w-absmax" not in head_block  # not a headline configuration
