"""Offline calibration from logged observations, and the open-loop validation that comes with it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import QUICK_OVERRIDES, QUICK_PLAN
from typer.testing import CliRunner

from edgeq.calibration.dataset import CalibrationDataError, load_observations, split_holdout
from edgeq.cli import app
from edgeq.deploy.runtime import OrtPolicy
from edgeq.envs import env_factory
from edgeq.errors import EdgeqError
from edgeq.ingest.sb3 import load_sb3
from edgeq.pipeline import quantize
from edgeq.rollout import run_episodes
from edgeq.validate.validator import split_measurements

ONNX_FIXTURE = Path(__file__).parent / "fixtures" / "onnx" / "sac-pendulum-isaac.onnx"


@pytest.fixture(scope="module")
def logged(sac_pendulum: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log of the trained policy's visited observations in Pendulum-v1: 5 episodes, 1000 rows, as a robot
    would record them (time order)."""
    runtime = OrtPolicy(load_sb3(sac_pendulum).model.SerializeToString())
    seen: list[np.ndarray] = []
    run_episodes(env_factory("Pendulum-v1"), runtime, [900, 901, 902, 903, 904], num_envs=1,
                 on_step=lambda obs, act, active: seen.append(obs[active]))
    path = tmp_path_factory.mktemp("log") / "pendulum-log.npz"
    np.savez(path, observations=np.concatenate(seen), rewards=np.zeros(1000))
    return path


def test_npz_reading_and_errors(logged: Path, tmp_path: Path) -> None:
    log = load_observations(logged)
    assert log.observations.shape == (1000, 3) and log.observations.dtype == np.float32
    assert log.key == "observations" and log.sha256 == hashlib.sha256(logged.read_bytes()).hexdigest()

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, states=np.zeros((4, 3)), actions=np.zeros((4, 1)))
    with pytest.raises(CalibrationDataError, match=r"wrong.npz: no array named 'obs' or 'observations' \(found "
                                                   r"keys \['states', 'actions'\]\)"):
        load_observations(wrong)
    assert load_observations(wrong, key="states").observations.shape == (4, 3)

    pickled = tmp_path / "objects.npz"
    np.savez(pickled, obs=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(CalibrationDataError, match="without unpickling"):
        load_observations(pickled)

    nan = tmp_path / "nan.npz"
    bad = np.ones((5, 3))
    bad[3, 1] = np.nan
    np.savez(nan, obs=bad)
    with pytest.raises(CalibrationDataError, match=r"1 non-finite values \(first at row 3, column 1\)"):
        load_observations(nan)
    with pytest.raises(CalibrationDataError, match="expected a .npz of observations"):
        load_observations(tmp_path / "log.csv")


def test_holdout_is_the_tail() -> None:
    obs = np.arange(20, dtype=np.float32).reshape(10, 2)
    calib, held = split_holdout(obs, 0.3)
    assert np.array_equal(calib, obs[:7]) and np.array_equal(held, obs[7:])
    with pytest.raises(CalibrationDataError, match=r"expected a value in \(0, 1\)"):
        split_holdout(obs, 1.0)
    with pytest.raises(CalibrationDataError, match="too few"):
        split_holdout(obs[:1], 0.2)


def test_quantize_without_env_reports_open_loop_action_error(sac_pendulum: Path, logged: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    result = quantize(sac_pendulum, None, out, calib_data=logged, holdout_fraction=0.25, overrides=QUICK_OVERRIDES)
    validation = json.loads((out / "validation.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert validation["closed_loop"] is False and "returns cannot be measured" in validation["reason"]
    assert validation["env_id"] is None and manifest["env"] is None
    assert validation["held_out"]["rows"] == [750, 1000] and validation["held_out"]["samples"] == 250
    assert manifest["calibration"]["source"] == "observations" and manifest["calibration"]["steps"] == 750
    assert manifest["calibration"]["data"]["sha256"] == hashlib.sha256(logged.read_bytes()).hexdigest()
    assert "float" not in validation["targets"]["cpu"]  # no returns without an env
    # timings are measurements: kept in memory for the summary, written to measurements.json, not validation.json
    assert split_measurements(result.validation)[0] == validation
    assert "timings" in json.loads((out / "measurements.json").read_text())

    # the reported error is the bundle's own int8-vs-float error on exactly the held-out rows, for the
    # file the CPU target runs (policy.int8.cpu.onnx)
    held = load_observations(logged).observations[750:]
    f = OrtPolicy(out / "policy.fp32.onnx").act(held).astype(np.float64)
    q = OrtPolicy(out / manifest["models"]["int8-cpu"]).act(held).astype(np.float64)
    err = validation["targets"]["cpu"]["action_error"]["on_held_out_observations"]
    assert err["steps"] == 250
    assert err["mean_abs"] == pytest.approx(float(np.abs(q - f).mean()), rel=1e-9)
    assert err["max_abs"] == pytest.approx(float(np.abs(q - f).max()), rel=1e-9)
    assert 0.0 < err["mean_abs"] < 2.0  # int8 differs, but acts within the action range [-2, 2]


def test_cli_calib_data_without_env_and_with_onnx_bounds(logged: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    res = CliRunner().invoke(app, ["quantize", str(ONNX_FIXTURE), "--calib-data", str(logged), "--out", str(out),
                                   "--action-low", "-2", "--action-high", "2", *QUICK_PLAN])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # rich wraps lines to the terminal width
    assert "no return measured" in text and "open-loop on 200 held-out logged observations" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["action_space"]["low"] == [-2.0] and manifest["action_space"]["high"] == [2.0]
    assert manifest["observation_space"]["low"] == ["-inf"] * 3  # no env: the ONNX file has no bounds

    res = CliRunner().invoke(app, ["validate", str(out)])
    assert res.exit_code == 2 and "without an environment" in " ".join(res.output.split())

    res = CliRunner().invoke(app, ["quantize", str(ONNX_FIXTURE), "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "nothing to calibrate with" in " ".join(res.output.split())


def test_calib_data_with_env_validates_closed_loop(sac_pendulum: Path, logged: Path, tmp_path: Path) -> None:
    result = quantize(sac_pendulum, "Pendulum-v1", tmp_path / "b", calib_data=logged, episodes=3,
                      overrides=QUICK_OVERRIDES)
    assert result.validation["closed_loop"] is True
    assert result.manifest["calibration"]["steps"] == 1000 and result.manifest["calibration"]["held_out"] == 0
    assert len(result.validation["targets"]["cpu"]["int8"]["returns"]) == 3


def test_logged_observations_must_fit_the_policy(sac_pendulum: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.npz"
    np.savez(other, obs=np.zeros((50, 17), np.float32))
    with pytest.raises(EdgeqError, match="other.npz: logged observations have 17 features; the policy expects 3"):
        quantize(sac_pendulum, None, tmp_path / "b", calib_data=other)
    assert not (tmp_path / "b").exists()


def _minari_storage() -> str | None:
    """A Minari storage backend that can be written here (each needs its own optional package)."""
    if importlib.util.find_spec("minari") is None:
        return None
    return next((fmt for fmt, pkg in (("hdf5", "h5py"), ("arrow", "pyarrow")) if importlib.util.find_spec(pkg)), None)


@pytest.mark.skipif(_minari_storage() is None,
                    reason="Minari datasets are optional: minari (with h5py or pyarrow) is not installed")
def test_minari_dataset(sac_pendulum: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gymnasium as gym
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    policy = OrtPolicy(load_sb3(sac_pendulum).model.SerializeToString())
    env = gym.make("Pendulum-v1")
    buffers = []
    for seed in (0, 1):
        obs, _ = env.reset(seed=seed)
        observations, actions, rewards, terms, truncs = [obs], [], [], [], []
        for _ in range(200):
            action = policy.act(obs[None].astype(np.float32))[0]
            obs, reward, term, trunc, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
            terms.append(term)
            truncs.append(trunc)
        buffers.append(EpisodeBuffer(id=seed, seed=seed, observations=np.array(observations),
                                     actions=np.array(actions), rewards=rewards, terminations=terms,
                                     truncations=truncs, infos={}))
    minari.create_dataset_from_buffers("edgeq/pendulum/test-v0", buffers, env=env, eval_env=env,
                                       algorithm_name="SAC", author="edgeq tests", author_email="tests@localhost",
                                       description="trained SAC on Pendulum-v1", data_format=_minari_storage())
    log = load_observations("minari:edgeq/pendulum/test-v0")
    assert log.kind == "minari" and log.episodes == 2
    assert log.observations.shape == (400, 3)  # 201 observations per episode, the final one dropped
    expected = np.concatenate([b.observations[:-1] for b in buffers]).astype(np.float32)
    assert np.array_equal(log.observations, expected)
    by_path = load_observations(tmp_path / "minari" / "edgeq" / "pendulum" / "test-v0")
    assert np.array_equal(by_path.observations, expected)
    with pytest.raises(CalibrationDataError, match="not found locally"):
        load_observations("minari:edgeq/pendulum/missing-v0")
