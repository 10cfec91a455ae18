"""Seeded disturbances for calibration and robustness validation: pushes and action noise.

Both are gymnasium wrappers whose random draws are re-seeded from the episode's reset seed, so the
float and the INT8 policy meet the same push schedule on the same seed (a paired comparison), and
calibration with disturbances is reproducible.

* :class:`PushWrapper` (MuJoCo-based envs): at random steps, adds a random velocity to the root
  body's horizontal translational degrees of freedom (``data.qvel``), like legged_gym's
  ``push_robots`` kicks a robot's base. Intervals between pushes are drawn uniformly from
  ``[min_interval, max_interval]`` steps; each kicked DOF gets ``uniform(-speed, speed)`` (m/s).
* :class:`ActionNoiseWrapper`: Gaussian noise on the actions the env receives (std as a fraction of
  each action's half-range), e.g. actuator noise.

A disturbance is written on the command line as ``KIND:key=value,...``, for example
``push:speed=1.5,interval=40-120`` or ``action_noise:std=0.2`` (:func:`parse_perturbation`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from edgeq.errors import EnvironmentSpecError

#: mjtJoint values
_FREE, _SLIDE = 0, 2


def _episode_rng(base_seed: int, seed: int | None, current: np.random.Generator | None) -> np.random.Generator:
    if seed is not None:
        return np.random.default_rng([int(base_seed) & 0xFFFFFFFF, int(seed) & 0xFFFFFFFF])
    return current if current is not None else np.random.default_rng(base_seed)


def root_push_dofs(model: Any) -> list[int]:
    """``qvel`` indices of the root body's horizontal translational DOFs in a MuJoCo model.

    The root body is the one attached to the world that carries joints: a free joint contributes its
    x and y velocity, slide joints whose axis is not vertical contribute their velocity (cart
    rails, planar walkers' ``rootx``).
    """
    dofs: list[int] = []
    for j in range(int(model.njnt)):
        body = int(model.jnt_bodyid[j])
        if int(model.body_parentid[body]) != 0:
            continue
        adr, jtype = int(model.jnt_dofadr[j]), int(model.jnt_type[j])
        if jtype == _FREE:
            dofs += [adr, adr + 1]
        elif jtype == _SLIDE and abs(float(model.jnt_axis[j][2])) < 0.5:
            dofs.append(adr)
    return dofs


class PushWrapper(gym.Wrapper):  # type: ignore[type-arg]
    """Kick the root body's velocity at random times (MuJoCo envs: ``env.unwrapped.data.qvel``).

    ``info["push"]`` holds the velocity added on the step where a push happens. ``pushes`` counts
    the pushes of the current episode.
    """

    def __init__(self, env: gym.Env, speed: float = 1.0, interval: tuple[int, int] = (50, 150),
                 dofs: Sequence[int] | None = None, seed: int = 0) -> None:
        super().__init__(env)
        data = getattr(env.unwrapped, "data", None)
        model = getattr(env.unwrapped, "model", None)
        if data is None or model is None or not hasattr(data, "qvel"):
            raise EnvironmentSpecError(f"PushWrapper needs a MuJoCo-based env (env.unwrapped.data.qvel); "
                                       f"{env.unwrapped.__class__.__name__} has none. Use action_noise or the "
                                       "env's own disturbances (--env-kwargs) instead")
        lo, hi = int(interval[0]), int(interval[1])
        if speed <= 0 or lo < 1 or hi < lo:
            raise EnvironmentSpecError(f"push: speed must be > 0 and interval a range 1 <= min <= max steps, got "
                                       f"speed={speed}, interval={interval}")
        self.dofs = list(dofs) if dofs is not None else root_push_dofs(model)
        if not self.dofs or max(self.dofs) >= len(data.qvel):
            raise EnvironmentSpecError(f"push: no horizontal root degree of freedom found in "
                                       f"{env.unwrapped.__class__.__name__} (qvel size {len(data.qvel)}); "
                                       "pass dofs=[...] (qvel indices)")
        self._data: Any = data
        self.speed, self.interval, self.seed = float(speed), (lo, hi), int(seed)
        self._rng: np.random.Generator | None = None
        self._t = 0
        self._next = lo
        self.pushes = 0

    def _schedule(self) -> None:
        assert self._rng is not None
        self._next = self._t + int(self._rng.integers(self.interval[0], self.interval[1] + 1))

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        self._rng = _episode_rng(self.seed, seed, self._rng)
        self._t, self.pushes = 0, 0
        self._schedule()
        return self.env.reset(seed=seed, options=options)

    def step(self, action: Any) -> Any:
        delta = None
        if self._t + 1 == self._next:
            assert self._rng is not None
            delta = self._rng.uniform(-self.speed, self.speed, size=len(self.dofs))
            qvel = self._data.qvel
            qvel[self.dofs] += delta
            self.pushes += 1
        self._t += 1
        if delta is not None:
            self._schedule()
        obs, reward, terminated, truncated, info = self.env.step(action)
        if delta is not None:
            info = {**info, "push": delta}
        return obs, reward, terminated, truncated, info


class ActionNoiseWrapper(gym.ActionWrapper):  # type: ignore[type-arg]
    """Gaussian noise on the env's actions: std ``std`` x half-range (absolute std if unbounded)."""

    def __init__(self, env: gym.Env, std: float = 0.1, seed: int = 0) -> None:
        super().__init__(env)
        if std <= 0:
            raise EnvironmentSpecError(f"action_noise: std must be > 0, got {std}")
        space: Any = env.action_space
        low, high = np.asarray(space.low, np.float64), np.asarray(space.high, np.float64)
        bounded = np.isfinite(low) & np.isfinite(high)
        self._scale = np.where(bounded, (high - low) / 2, 1.0) * float(std)
        self._low, self._high = np.where(bounded, low, -np.inf), np.where(bounded, high, np.inf)
        self.std, self.seed = float(std), int(seed)
        self._rng: np.random.Generator | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        self._rng = _episode_rng(self.seed, seed, self._rng)
        return self.env.reset(seed=seed, options=options)

    def action(self, action: Any) -> Any:
        if self._rng is None:
            self._rng = _episode_rng(self.seed, None, None)
        a = np.asarray(action, np.float64)
        noisy = a + self._rng.normal(size=a.shape) * self._scale
        return np.clip(noisy, self._low, self._high).astype(self.env.action_space.dtype)


@dataclass(frozen=True)
class PerturbationSpec:
    """One disturbance: ``kind`` (``push`` or ``action_noise``) and its keyword arguments."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    def wrap(self, env: gym.Env) -> gym.Env:
        if self.kind == "push":
            return PushWrapper(env, **self.params)
        return ActionNoiseWrapper(env, **self.params)

    def to_json(self) -> dict[str, Any]:
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        return {"kind": self.kind, **params}

    def __str__(self) -> str:
        def fmt(v: Any) -> str:
            return f"{v[0]}-{v[1]}" if isinstance(v, tuple) else str(v)

        return f"{self.kind}:" + ",".join(f"{k}={fmt(v)}" for k, v in self.params.items())


_KEYS: dict[str, dict[str, Callable[[str], Any]]] = {
    "push": {"speed": float, "seed": int, "interval": lambda v: _range(v),
             "dofs": lambda v: [int(x) for x in v.split("+")]},
    "action_noise": {"std": float, "seed": int},
}
_ALIASES = {"push": "push", "action_noise": "action_noise", "action-noise": "action_noise", "noise": "action_noise"}


def _range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    return (int(lo), int(hi if sep else lo))


def parse_perturbation(text: str | PerturbationSpec) -> PerturbationSpec:
    """``push:speed=1.5,interval=40-120`` / ``action_noise:std=0.2`` → :class:`PerturbationSpec`."""
    if isinstance(text, PerturbationSpec):
        return text
    kind_text, _, rest = text.strip().partition(":")
    kind = _ALIASES.get(kind_text.strip().lower())
    if kind is None:
        raise EnvironmentSpecError(f"perturbation {text!r}: unknown kind {kind_text!r}; expected push or action_noise "
                                   "(e.g. 'push:speed=1.5,interval=40-120' or 'action_noise:std=0.2')")
    params: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in _KEYS[kind]:
            raise EnvironmentSpecError(f"perturbation {text!r}: {item!r} is not key=value with key in "
                                       f"{sorted(_KEYS[kind])}")
        try:
            params[key] = _KEYS[kind][key](value.strip())
        except ValueError:
            raise EnvironmentSpecError(f"perturbation {text!r}: cannot read {key}={value!r}") from None
    return PerturbationSpec(kind, params)


def perturbed_factory(make_env: Callable[[], Any], specs: Sequence[str | PerturbationSpec]) -> Callable[[], Any]:
    """``make_env`` with the disturbances ``specs`` wrapped around it (in order)."""
    parsed = [parse_perturbation(s) for s in specs]
    if not parsed:
        return make_env

    def make() -> Any:
        env = make_env()
        for spec in parsed:
            env = spec.wrap(env)
        return env

    return make
