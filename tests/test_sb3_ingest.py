"""SB3 archives → float ONNX: the same deterministic actions as SB3's own predict()."""

from __future__ import annotations

import pickle
import sys
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import onnx
import pytest
import torch

from edgeq.deploy.runtime import OrtPolicy
from edgeq.errors import PolicyFormatError
from edgeq.ingest.safe_pickle import GlobalRef, inert_loads
from edgeq.ingest.sb3 import load_sb3

TOL = 1e-5


def _obs_batch(space: gym.spaces.Box, n: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = np.maximum(space.low, -5.0)
    high = np.minimum(space.high, 5.0)
    return rng.uniform(low, high, size=(n, *space.shape)).astype(np.float32)


def _max_diff_vs_sb3(model, path: Path, obs: np.ndarray, **load_kwargs) -> float:
    policy = load_sb3(path, **load_kwargs)
    ours = OrtPolicy(policy.model.SerializeToString()).act(obs)
    theirs, _ = model.predict(obs, deterministic=True)
    return float(np.abs(ours - theirs).max())


def _build(algo: str, env_id: str, **kwargs):
    import sb3_contrib
    import stable_baselines3

    cls = getattr(stable_baselines3, algo, None) or getattr(sb3_contrib, algo)
    torch.manual_seed(0)
    return cls("MlpPolicy", env_id, seed=0, device="cpu", **kwargs)


CASES = [
    ("SAC", "Pendulum-v1", {}),
    ("SAC", "Pendulum-v1", {"use_sde": True}),  # gSDE: Hardtanh(±clip_mean) before tanh
    ("SAC", "HalfCheetah-v5", {"policy_kwargs": {"net_arch": [64, 32], "activation_fn": torch.nn.ELU}}),
    ("TD3", "HalfCheetah-v5", {}),
    ("DDPG", "Pendulum-v1", {}),
    ("TQC", "Pendulum-v1", {}),
    ("TQC", "Pendulum-v1", {"use_sde": True}),
    ("PPO", "HalfCheetah-v5", {}),
    ("PPO", "Pendulum-v1", {"use_sde": True}),
    ("PPO", "Pendulum-v1", {"use_sde": True, "policy_kwargs": {"squash_output": True}}),
    ("A2C", "HalfCheetah-v5", {"policy_kwargs": {"net_arch": dict(pi=[32, 32], vf=[16]),
                                                 "activation_fn": torch.nn.ReLU}}),
]


@pytest.mark.parametrize("algo,env_id,kwargs", CASES, ids=[f"{a}-{e}-{i}" for i, (a, e, _) in enumerate(CASES)])
def test_matches_sb3_predict(tmp_path: Path, algo: str, env_id: str, kwargs: dict) -> None:
    model = _build(algo, env_id, **kwargs)
    # move weights away from init so squashing/clipping paths are exercised
    with torch.no_grad():
        for p in model.policy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / f"{algo}.zip"
    model.save(path)
    policy = load_sb3(path)
    assert policy.source.algorithm == algo
    obs = _obs_batch(model.observation_space)
    assert _max_diff_vs_sb3(model, path, obs) <= TOL


def test_sac_fixture_matches_sb3(sac_pendulum: Path) -> None:
    from stable_baselines3 import SAC

    model = SAC.load(sac_pendulum, device="cpu")
    assert _max_diff_vs_sb3(model, sac_pendulum, _obs_batch(model.observation_space)) <= TOL


def test_onnx_graph_conventions(sac_pendulum: Path) -> None:
    policy = load_sb3(sac_pendulum)
    onnx.checker.check_model(policy.model, full_check=True)
    g = policy.model.graph
    assert [i.name for i in g.input] == ["obs"] and [o.name for o in g.output] == ["actions"]
    dims = g.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 3
    assert policy.source.details["net_arch"] == [256, 256]
    # dynamic batch: 1 and 33 rows both run
    rt = OrtPolicy(policy.model.SerializeToString())
    assert rt.act(np.zeros((1, 3), np.float32)).shape == (1, 1)
    assert rt.act(np.zeros((33, 3), np.float32)).shape == (33, 1)


def test_sb3_1x_legacy_archive_loads_without_unpickling(sb3_1x_ppo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Any real unpickling of the archive's cloudpickled fields would need the old 'gym' package.
    monkeypatch.setitem(sys.modules, "gym", None)
    calls: list[str] = []
    real_loads = pickle.loads
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append("loads") or real_loads(*a, **k))
    policy = load_sb3(sb3_1x_ppo)
    assert calls == []
    assert policy.source.algorithm == "PPO"
    assert policy.source.details["sb3_version"].startswith("1.")
    assert policy.source.details["use_sde"] is True
    assert policy.action_space.low == (-2.0,) and policy.obs_space.shape == (3,)


def test_sb3_1x_matches_sb3_predict(sb3_1x_ppo: Path) -> None:
    from stable_baselines3 import PPO

    env = gym.make("Pendulum-v1")
    # SB3 itself can only open this archive when told to skip the gym-pickled fields.
    model = PPO.load(sb3_1x_ppo, device="cpu", custom_objects={
        "observation_space": env.observation_space, "action_space": env.action_space,
        "lr_schedule": lambda _: 0.0, "clip_range": lambda _: 0.2})
    assert _max_diff_vs_sb3(model, sb3_1x_ppo, _obs_batch(env.observation_space)) <= TOL


def test_vecnormalize_becomes_fp32_preop(tmp_path: Path) -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    venv = VecNormalize(make_vec_env("HalfCheetah-v5", n_envs=2, seed=0), clip_obs=5.0)
    venv.reset()
    for _ in range(300):  # update the running statistics (no learning)
        venv.step(np.stack([venv.action_space.sample() for _ in range(2)]))
    model = PPO("MlpPolicy", venv, seed=0, device="cpu")
    (tmp_path / "ppo").mkdir()
    model.save(tmp_path / "ppo.zip")
    venv.save(str(tmp_path / "ppo" / "vecnormalize.pkl"))  # the RL Zoo layout, found automatically
    policy = load_sb3(tmp_path / "ppo.zip")
    assert policy.preprocess["normalize"]["clip"] == 5.0
    assert {n.op_type for n in policy.model.graph.node} >= {"Sub", "Div", "Clip"}
    raw = _obs_batch(venv.observation_space) * 4.0
    venv.training = False
    theirs, _ = model.predict(venv.normalize_obs(raw), deterministic=True)
    ours = OrtPolicy(policy.model.SerializeToString()).act(raw)
    assert np.abs(ours - theirs).max() <= TOL
    # an explicit path works too, and a missing one is a clear error
    assert load_sb3(tmp_path / "ppo.zip", vecnormalize=tmp_path / "ppo" / "vecnormalize.pkl").preprocess
    with pytest.raises(PolicyFormatError, match="no such file"):
        load_sb3(tmp_path / "ppo.zip", vecnormalize=tmp_path / "missing.pkl")


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/edgeq-pwned-marker",))


def test_inert_unpickler_runs_no_code(tmp_path: Path) -> None:
    marker = Path("/tmp/edgeq-pwned-marker")
    marker.unlink(missing_ok=True)
    obj = inert_loads(pickle.dumps({"x": _Exploit(), "a": np.arange(4.0)}))
    assert not marker.exists()
    assert isinstance(obj["x"], GlobalRef)
    np.testing.assert_array_equal(obj["a"], np.arange(4.0))


def test_bad_archives(tmp_path: Path) -> None:
    with pytest.raises(PolicyFormatError, match="no such file"):
        load_sb3(tmp_path / "missing.zip")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(PolicyFormatError, match="not a zip archive"):
        load_sb3(bad)
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(PolicyFormatError, match="no 'data' entry"):
        load_sb3(empty)


def test_unsupported_algorithm_and_spaces(tmp_path: Path) -> None:
    from stable_baselines3 import DQN, PPO

    DQN("MlpPolicy", "CartPole-v1", device="cpu").save(tmp_path / "dqn.zip")
    with pytest.raises(PolicyFormatError, match="unsupported policy class .*DQNPolicy"):
        load_sb3(tmp_path / "dqn.zip")
    PPO("MlpPolicy", "CartPole-v1", device="cpu").save(tmp_path / "ppo_discrete.zip")
    with pytest.raises(PolicyFormatError, match="action_space is a Discrete space.*expected gymnasium.spaces.Box"):
        load_sb3(tmp_path / "ppo_discrete.zip")


def test_crossq_batchrenorm_folding_matches_sb3(tmp_path: Path) -> None:
    from sb3_contrib import CrossQ

    torch.manual_seed(0)
    model = CrossQ("MlpPolicy", "HalfCheetah-v5", seed=0, device="cpu",
                   policy_kwargs={"net_arch": {"pi": [64, 64], "qf": [32]}})
    # give every BatchRenorm non-trivial running statistics and affine parameters
    with torch.no_grad():
        for name, buf in model.actor.named_buffers():
            if name.endswith("ra_mean"):
                buf.copy_(torch.randn_like(buf) * 2.0)
            elif name.endswith("ra_var"):
                buf.copy_(torch.rand_like(buf) * 3.0 + 0.01)
        for p in model.actor.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "crossq.zip"
    model.save(path)
    policy = load_sb3(path)
    assert policy.source.algorithm == "CrossQ"
    folded = policy.source.details["folded_batchnorm"]
    # three BatchRenorm layers: the one on the raw observation stays an fp32 pre-op, the others fold
    assert folded == ["actor.latent_pi.3", "actor.latent_pi.6"]
    ops = [n.op_type for n in policy.model.graph.node]
    assert ops[:2] == ["Mul", "Add"]  # the kept input normalization
    assert ops.count("Gemm") == 3
    obs = _obs_batch(model.observation_space)
    assert _max_diff_vs_sb3(model, path, obs) <= TOL
    # unfolded (BatchRenorm kept as Mul/Add everywhere) is the same function
    unfolded = load_sb3(path, fold_batchnorm=False)
    assert unfolded.source.details["folded_batchnorm"] == []
    assert np.abs(OrtPolicy(unfolded.model.SerializeToString()).act(obs)
                  - OrtPolicy(policy.model.SerializeToString()).act(obs)).max() <= TOL
