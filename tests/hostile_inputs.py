"""Hostile and broken inputs made from the committed fixtures (for the hardening and fuzz tests)."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"
SAC_PENDULUM = FIXTURES / "policies" / "sac-pendulum.zip"
PPO_VECNORM = FIXTURES / "policies" / "ppo-halfcheetah-vecnorm.zip"
VECNORM_PKL = FIXTURES / "policies" / "ppo-halfcheetah-vecnorm" / "vecnormalize.pkl"
ISAAC_ONNX = FIXTURES / "onnx" / "sac-pendulum-isaac.onnx"


def read_entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def write_zip(path: Path, entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression, compresslevel=1) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def with_data(src: Path, out: Path, data: bytes) -> Path:
    entries = read_entries(src)
    entries["data"] = data
    return write_zip(out, entries)


def state_dict(src: Path = SAC_PENDULUM) -> dict[str, Any]:
    import torch

    return torch.load(io.BytesIO(read_entries(src)["policy.pth"]), weights_only=True)


def with_state(src: Path, out: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    import torch

    sd = state_dict(src)
    edit(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    entries = read_entries(src)
    entries["policy.pth"] = buf.getvalue()
    return write_zip(out, entries)


class VecNormalize:
    """Stands in for SB3's class while pickling; the stream then names SB3's module."""


class RunningMeanStd:
    """Stands in for SB3's class while pickling."""


def vecnorm_pickle(mean: Any, var: Any, epsilon: Any = 1e-8, clip_obs: Any = 10.0) -> bytes:
    """A pickle shaped like SB3's VecNormalize (protocol 0, so the class references can be renamed to SB3's
    modules in the byte stream; nothing of SB3 is imported or touched)."""
    rms = RunningMeanStd()
    rms.__dict__.update(mean=mean, var=var, count=1.0)
    vn = VecNormalize()
    vn.__dict__.update(obs_rms=rms, norm_obs=True, epsilon=epsilon, clip_obs=clip_obs)
    data = pickle.dumps(vn, protocol=0)
    return (data.replace(b"chostile_inputs\nVecNormalize\n",
                         b"cstable_baselines3.common.vec_env.vec_normalize\nVecNormalize\n")
            .replace(b"chostile_inputs\nRunningMeanStd\n",
                     b"cstable_baselines3.common.running_mean_std\nRunningMeanStd\n"))


def data_json(src: Path = SAC_PENDULUM) -> dict[str, Any]:
    return json.loads(read_entries(src)["data"])


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def scaled_weights(factor: float, src: Path = SAC_PENDULUM) -> Callable[[dict[str, Any]], None]:
    def edit(sd: dict[str, Any]) -> None:
        for k, v in sd.items():
            if k.startswith("actor.") and v.is_floating_point():
                sd[k] = v * factor

    return edit


def np_obs(n: int) -> np.ndarray:
    return np.zeros(n, np.float32)


# -- envs that misbehave (``--env tests.hostile_inputs:NAME``) ----------------------------------------
def _edit(what: str, value: float, after: int = 5) -> Any:
    """Pendulum whose observation or reward becomes ``value`` after ``after`` steps."""
    import gymnasium as gym

    class Edit(gym.Wrapper):  # type: ignore[type-arg]
        t = 0

        def reset(self, **kw: Any) -> Any:
            self.t = 0
            return self.env.reset(**kw)

        def step(self, action: Any) -> Any:
            obs, reward, term, trunc, info = self.env.step(action)
            self.t += 1
            if self.t > after:
                if what == "obs":
                    obs = obs.copy()
                    obs[1] = value
                else:
                    reward = value
            return obs, reward, term, trunc, info

    return Edit(gym.make("Pendulum-v1"))


def nan_observation() -> Any:
    return _edit("obs", float("nan"))


def inf_observation() -> Any:
    return _edit("obs", float("inf"))


def nan_reward() -> Any:
    return _edit("reward", float("nan"))


def raises() -> Any:
    raise RuntimeError("simulator license server unreachable")


def returns_42() -> Any:
    return 42
