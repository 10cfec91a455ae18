"""A small user-supplied environment for the ``--env module:callable`` tests.

``WindyPendulum`` is the classic pendulum swing-up (the dynamics of gymnasium's ``Pendulum-v1``,
written out here as a user would wrap their own simulator) with a constant wind torque: the
env's own disturbance, set through ``--env-kwargs '{"wind": 1.0}'``. With ``wind=0`` it matches
``Pendulum-v1`` step for step on the same seed.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


class WindyPendulum(gym.Env):  # type: ignore[type-arg]
    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, wind: float = 0.0, max_steps: int = 200) -> None:
        self.wind, self.max_steps = float(wind), int(max_steps)
        self.max_speed, self.max_torque, self.dt, self.g, self.m, self.l = 8.0, 2.0, 0.05, 10.0, 1.0, 1.0
        high = np.array([1.0, 1.0, self.max_speed], dtype=np.float32)
        self.observation_space = gym.spaces.Box(-high, high, dtype=np.float32)
        self.action_space = gym.spaces.Box(-self.max_torque, self.max_torque, shape=(1,), dtype=np.float32)
        self.state = np.zeros(2)
        self.steps = 0

    def _obs(self) -> np.ndarray:
        th, thdot = self.state
        return np.array([np.cos(th), np.sin(th), thdot], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        super().reset(seed=seed)
        self.state = self.np_random.uniform(low=[-np.pi, -1.0], high=[np.pi, 1.0])
        self.steps = 0
        return self._obs(), {}

    def step(self, action: Any) -> Any:
        th, thdot = self.state
        u = float(np.clip(np.asarray(action, np.float64).reshape(-1)[0], -self.max_torque, self.max_torque))
        norm_th = ((th + np.pi) % (2 * np.pi)) - np.pi
        cost = norm_th**2 + 0.1 * thdot**2 + 0.001 * u**2
        torque = u + self.wind
        newthdot = thdot + (3 * self.g / (2 * self.l) * np.sin(th) + 3.0 / (self.m * self.l**2) * torque) * self.dt
        newthdot = np.clip(newthdot, -self.max_speed, self.max_speed)
        self.state = np.array([th + newthdot * self.dt, newthdot])
        self.steps += 1
        return self._obs(), -float(cost), False, self.steps >= self.max_steps, {}


def make_windy_pendulum(wind: float = 0.0, max_steps: int = 200) -> WindyPendulum:
    """The entry point passed as ``--env custom_envs:make_windy_pendulum``."""
    return WindyPendulum(wind=wind, max_steps=max_steps)
