"""Recording what each seeded episode visited, to compare float and quantized trajectories step by step.

:class:`TrajectoryStore` wraps an env factory; every env it makes records the observations, actions
and rewards of each episode that was reset with a seed, keyed by that seed. Vector envs keep
working unchanged (the wrapper is a plain :class:`gymnasium.Wrapper`), so the rollout code does
not need to know which sub-environment ran which episode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np


class TrajectoryStore:
    """Per-seed trajectories: ``obs[seed]`` is [T+1, obs_dim], ``actions[seed]`` [T, act_dim].

    Only seeds in ``keep`` are recorded (all seeded episodes if None). A seed that is run twice
    keeps its last episode.
    """

    def __init__(self, keep: Sequence[int] | None = None) -> None:
        self.keep = None if keep is None else {int(s) for s in keep}
        self._obs: dict[int, list[np.ndarray]] = {}
        self._act: dict[int, list[np.ndarray]] = {}
        self._rew: dict[int, list[float]] = {}
        self.success: dict[int, bool] = {}  # from info["is_success"] / info["success"] where the env reports it

    @classmethod
    def merge(cls, stores: Sequence[TrajectoryStore]) -> TrajectoryStore:
        """One store with the episodes of ``stores`` (disjoint seeds; a later store wins a shared seed)."""
        out = cls()
        keeps = [s.keep for s in stores]
        out.keep = None if any(k is None for k in keeps) else set().union(*[k for k in keeps if k is not None])
        for s in stores:
            out._obs.update(s._obs)
            out._act.update(s._act)
            out._rew.update(s._rew)
            out.success.update(s.success)
        return out

    def wrap(self, make_env: Callable[[], Any]) -> Callable[[], Any]:
        """A factory whose envs record into this store."""
        return lambda: _RecordingEnv(make_env(), self)

    # -- filled by the wrapper ----------------------------------------------------------------
    def _start(self, seed: int | None, obs: Any) -> int | None:
        if seed is None or (self.keep is not None and int(seed) not in self.keep):
            return None
        key = int(seed)
        self._obs[key] = [np.asarray(obs, np.float32).ravel().copy()]
        self._act[key], self._rew[key] = [], []
        return key

    def _step(self, key: int, action: Any, obs: Any, reward: float) -> None:
        self._act[key].append(np.asarray(action, np.float32).ravel().copy())
        self._obs[key].append(np.asarray(obs, np.float32).ravel().copy())
        self._rew[key].append(float(reward))

    # -- reading ------------------------------------------------------------------------------
    @property
    def seeds(self) -> list[int]:
        return sorted(self._obs)

    def observations(self, seed: int) -> np.ndarray:
        """Observations seen in the episode of ``seed``: the initial one and one after each step."""
        return np.stack(self._obs[int(seed)])

    def actions(self, seed: int) -> np.ndarray:
        return np.stack(self._act[int(seed)]) if self._act[int(seed)] else np.zeros((0, 0), np.float32)

    def rewards(self, seed: int) -> np.ndarray:
        return np.asarray(self._rew[int(seed)], np.float64)

    def sample_observations(self, max_rows: int, seed: int = 0) -> np.ndarray:
        """A uniform sample (without replacement) of at most ``max_rows`` states the policy acted on."""
        rows = [self.observations(s)[:-1] for s in self.seeds if len(self._act[s])]
        if not rows:
            return np.zeros((0, 0), np.float32)
        allobs = np.concatenate(rows)
        if len(allobs) <= max_rows:
            return allobs
        idx = np.sort(np.random.default_rng(seed).choice(len(allobs), size=max_rows, replace=False))
        return allobs[idx]


class _RecordingEnv(gym.Wrapper):  # type: ignore[misc]
    """Passes everything through; records seeded episodes into a :class:`TrajectoryStore`."""

    def __init__(self, env: Any, store: TrajectoryStore) -> None:
        super().__init__(env)
        self._store = store
        self._key: int | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        obs, info = self.env.reset(seed=seed, options=options)
        self._key = self._store._start(seed, obs)
        return obs, info

    def step(self, action: Any) -> Any:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self._key is not None:
            self._store._step(self._key, action, obs, float(reward))
            for name in ("is_success", "success"):
                if name in info:
                    self._store.success[self._key] = bool(np.asarray(info[name]).any())
        return obs, reward, terminated, truncated, info


def divergence(reference: TrajectoryStore, candidate: TrajectoryStore, seeds: Sequence[int],
               *, scale: np.ndarray | None = None) -> dict[str, Any]:
    """How far candidate trajectories drift from the reference ones with the same seed, per step.

    The distance at step ``t`` is the RMS over observation dimensions of
    ``(obs_cand[t] - obs_ref[t]) / scale`` (``scale``: per-dimension std of the reference
    observations unless given), compared only while both episodes run. Returns, per step, the
    median and 90th percentile over seeds, and per seed the first step where it exceeds 0.1 and 1.
    """
    pairs = [(reference.observations(s), candidate.observations(s)) for s in seeds
             if s in reference._obs and s in candidate._obs]
    if not pairs:
        return {"steps": 0}
    if scale is None:
        allref = np.concatenate([r for r, _ in pairs])
        scale = allref.std(axis=0)
    sc = np.where(np.asarray(scale) > 1e-8, scale, 1.0)
    horizon = max(min(len(r), len(c)) for r, c in pairs)
    dist = np.full((len(pairs), horizon), np.nan)
    first: dict[str, list[int | None]] = {"0.1": [], "1": []}
    for i, (r, c) in enumerate(pairs):
        n = min(len(r), len(c))
        d = np.sqrt(np.mean(((c[:n] - r[:n]) / sc) ** 2, axis=1))
        dist[i, :n] = d
        for thr in first:
            hit = np.flatnonzero(d > float(thr))
            first[thr].append(int(hit[0]) if hit.size else None)
    median = np.nanmedian(dist, axis=0)  # every step has at least one episode (horizon = longest pair)
    p90 = np.nanpercentile(dist, 90, axis=0)
    return {"steps": int(horizon), "episodes": len(pairs), "metric": "RMS of obs difference / per-dim std",
            "median": [float(x) for x in median], "p90": [float(x) for x in p90],
            "final_median": float(median[-1]), "first_step_above": first}
