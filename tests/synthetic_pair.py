"""A cheap env and pairs of linear ONNX policies with a *known* return loss and failure rate.

``PairEnv`` runs ``T`` steps. Its observation is ``[bias, t/(T-1), u, z_t, flag]``: ``u`` is drawn
once per episode from the seed, ``z_t`` ~ N(0, 1) every step from the env's own random stream (so it
does not depend on the actions), ``flag`` is 1 at the last step of episodes with ``u < fall_share``.
The reward of a step is ``reward_per_step + action[0]``; ``action[1] > 0`` ends the episode as a
termination (a "fall") after that step's reward is paid, otherwise the time limit truncates it.

A policy ``a = obs @ W + b`` made by :func:`linear_policy` with ``shift``, ``noise`` and ``falls``
has, on every seed, return ``T·(reward_per_step + shift) + noise·Σ z_t`` and falls exactly on the
seeds with ``u < fall_share`` when ``falls`` is set. The float policy is ``shift=0, noise=0`` and
never falls, so the paired difference of a candidate is ``T·shift + noise·Σ z_t``: mean ``T·shift``,
spread ``noise·√T``, known in advance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OBS_DIM, ACT_DIM = 5, 2


class PairEnv(gym.Env):  # type: ignore[type-arg]
    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, steps: int = 10, reward_per_step: float = 10.0, fall_share: float = 0.5) -> None:
        self.T, self.r, self.fall_share = int(steps), float(reward_per_step), float(fall_share)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(OBS_DIM,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-10.0, 10.0, shape=(ACT_DIM,), dtype=np.float32)
        self.t, self.u = 0, 0.0

    def _obs(self) -> np.ndarray:
        z = float(self.np_random.normal())
        flag = float(self.t == self.T - 1 and self.u < self.fall_share)
        return np.array([1.0, self.t / max(self.T - 1, 1), self.u, z, flag], np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        super().reset(seed=seed)
        self.t = 0
        self.u = float(self.np_random.uniform())
        self.obs = self._obs()
        return self.obs, {}

    def step(self, action: Any) -> Any:
        a = np.asarray(action, np.float64).reshape(-1)
        reward = self.r + float(a[0])
        fell = bool(a[1] > 0.0)
        self.t += 1
        truncated = self.t >= self.T and not fell
        self.obs = self._obs()
        return self.obs, reward, fell, truncated, {"fell": fell}


def linear_policy(path: Path, *, shift: float = 0.0, noise: float = 0.0, falls: bool = False) -> Path:
    """An ONNX policy ``actions = obs @ W + b`` (Gemm), written to ``path``."""
    w = np.zeros((OBS_DIM, ACT_DIM), np.float32)
    b = np.array([shift, -0.5], np.float32)
    w[3, 0] = noise
    w[4, 1] = 1.0 if falls else 0.0
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["obs", "W", "b"], ["actions"])], "pair",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", OBS_DIM])],
        [helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["batch", ACT_DIM])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path
