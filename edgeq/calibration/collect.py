"""Calibration: roll the float policy out and stream statistics of every tensor INT8 will quantize.

The float graph is instrumented so that the inputs of its weighted layers are also graph outputs;
each step's values go to a :class:`~edgeq.calibration.observers.TensorObserver` (bounded memory:
histograms and per-channel maxima, never the activations themselves). A bounded reservoir of
visited observations is kept for later stages that need states (per-layer error, automatic choice).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from edgeq.calibration.observers import TensorObserver
from edgeq.deploy.runtime import OrtPolicy
from edgeq.graph.analysis import find_weighted_layers
from edgeq.policy import FloatPolicy
from edgeq.rollout import ActionPerturbation, EpisodeResults, run_episodes


@dataclass(frozen=True)
class ExplorationNoise:
    """Perturb calibration actions so the rollouts also visit states near the float trajectory.

    ``gaussian`` is the std of Gaussian noise as a fraction of each action's half-range;
    ``epsilon`` the probability that a row's action is replaced by a uniform random action.
    The float policy's own action (before noise) is what the observers see.
    """

    gaussian: float = 0.0
    epsilon: float = 0.0

    def make(self, low: np.ndarray, high: np.ndarray) -> ActionPerturbation | None:
        if self.gaussian <= 0 and self.epsilon <= 0:
            return None
        lo, hi = low.astype(np.float32), high.astype(np.float32)
        half = np.where(np.isfinite(hi - lo), (hi - lo) / 2, 1.0).astype(np.float32)
        bounded = np.isfinite(lo) & np.isfinite(hi)

        def perturb(actions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            out = actions
            if self.gaussian > 0:
                out = out + rng.normal(0.0, self.gaussian, size=out.shape).astype(np.float32) * half
            if self.epsilon > 0:
                rows = rng.random(out.shape[0]) < self.epsilon
                if rows.any():
                    rand = rng.uniform(np.where(bounded, lo, -1), np.where(bounded, hi, 1),
                                       size=(int(rows.sum()), out.shape[1]))
                    out = out.copy()
                    out[rows] = rand
            return np.clip(out, np.where(bounded, lo, -np.inf), np.where(bounded, hi, np.inf)).astype(np.float32)

        return perturb

    def to_json(self) -> dict[str, float]:
        return {"gaussian": self.gaussian, "epsilon": self.epsilon}


class ObservationReservoir:
    """A uniform random sample of at most ``capacity`` observations from a stream (Algorithm R)."""

    def __init__(self, capacity: int, dim: int, seed: int = 0) -> None:
        self.data = np.zeros((capacity, dim), np.float32)
        self.capacity, self.seen = capacity, 0
        self._rng = np.random.default_rng(seed)

    def add(self, rows: np.ndarray) -> None:
        for row in rows:
            if self.seen < self.capacity:
                self.data[self.seen] = row
            else:
                j = int(self._rng.integers(0, self.seen + 1))
                if j < self.capacity:
                    self.data[j] = row
            self.seen += 1

    def sample(self) -> np.ndarray:
        return self.data[: min(self.seen, self.capacity)].copy()


@dataclass
class CalibrationStats:
    """What calibration produced: one observer per quantizable tensor, plus provenance."""

    observers: dict[str, TensorObserver]
    observations: np.ndarray
    episodes: EpisodeResults | None
    steps: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": round(self.seconds, 3), **self.settings,
                "float_returns_during_calibration": (
                    None if self.episodes is None else [round(float(r), 3) for r in self.episodes.returns])}


def calibration_tensors(model: onnx.ModelProto) -> list[str]:
    """The tensors whose ranges INT8 needs: the data input of each weighted layer (deduplicated)."""
    seen: list[str] = []
    for layer in find_weighted_layers(model):
        if layer.input not in seen:
            seen.append(layer.input)
    return seen


def instrumented(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``tensors`` (float32, dynamic shape)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for name in tensors:
        if name not in existing:
            m.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return m


class _ObservingPolicy:
    """Acts with the float policy; :meth:`observe` feeds the last step's tensors to the observers."""

    def __init__(self, policy: FloatPolicy, tensors: list[str], observers: dict[str, TensorObserver],
                 reservoir: ObservationReservoir) -> None:
        self.runtime = OrtPolicy(instrumented(policy.model, tensors).SerializeToString(),
                                 state=[s.to_json() for s in policy.state])
        self.tensors, self.observers, self.reservoir = tensors, observers, reservoir
        self.output = policy.output_name
        self._last: dict[str, np.ndarray] = {}

    def reset(self, mask: np.ndarray | None = None) -> None:
        self.runtime.reset(mask)

    def act(self, obs: np.ndarray) -> np.ndarray:
        self._last = self.runtime.run(obs, [self.output, *self.tensors])
        return self._last[self.output]

    def observe(self, obs: np.ndarray, actions: np.ndarray, active: np.ndarray) -> None:
        """Rollout hook: record the rows of the last step that belong to counted episodes."""
        rows = np.asarray(active, bool)
        n = int(rows.sum())
        if n == 0:
            return
        for name in self.tensors:
            self.observers[name].update(self._last[name][rows].reshape(n, -1))
        self.reservoir.add(obs[rows])


def calibrate_rollouts(policy: FloatPolicy, make_env: Callable[[], Any], seeds: Sequence[int], *,
                       noise: ExplorationNoise = ExplorationNoise(), num_envs: int = 8,
                       reservoir_size: int = 4096, max_steps_per_episode: int | None = None,
                       progress: Callable[[int], None] | None = None) -> CalibrationStats:
    """Roll ``policy`` out on ``seeds`` and observe every tensor INT8 will quantize."""
    tensors = calibration_tensors(policy.model)
    observers = {t: TensorObserver(t) for t in tensors}
    reservoir = ObservationReservoir(reservoir_size, policy.obs_space.size, seed=int(seeds[0]) if seeds else 0)
    actor = _ObservingPolicy(policy, tensors, observers, reservoir)

    t0 = time.perf_counter()
    results = run_episodes(make_env, actor, seeds, num_envs=num_envs, on_step=actor.observe,
                           perturb=noise.make(policy.action_space.low_array.ravel(),
                                              policy.action_space.high_array.ravel()),
                           noise_seed=int(seeds[0]) if seeds else 0,
                           max_steps_per_episode=max_steps_per_episode, progress=progress)
    seconds = time.perf_counter() - t0
    return CalibrationStats(observers, reservoir.sample(), results, results.steps, seconds,
                            {"source": "rollout", "episodes": len(seeds), "seeds": [int(s) for s in seeds],
                             "noise": noise.to_json(), "num_envs": num_envs})


def calibrate_observations(policy: FloatPolicy, observations: np.ndarray, *, batch_size: int = 256,
                           reservoir_size: int = 4096,
                           progress: Callable[[int], None] | None = None) -> CalibrationStats:
    """Offline calibration from logged observations [N, obs_dim] (stateless policies).

    ``progress(n)`` is called with the number of observations processed since the last call.
    """
    obs = np.asarray(observations, np.float32).reshape(len(observations), -1)
    if obs.shape[1] != policy.obs_space.size:
        from edgeq.errors import EdgeqError

        raise EdgeqError(f"logged observations have {obs.shape[1]} features; the policy expects "
                         f"{policy.obs_space.size}")
    tensors = calibration_tensors(policy.model)
    observers = {t: TensorObserver(t) for t in tensors}
    reservoir = ObservationReservoir(reservoir_size, policy.obs_space.size)
    actor = _ObservingPolicy(policy, tensors, observers, reservoir)
    t0 = time.perf_counter()
    for i in range(0, len(obs), batch_size):
        chunk = obs[i:i + batch_size]
        actor.observe(chunk, actor.act(chunk), np.ones(len(chunk), bool))
        if progress is not None:
            progress(len(chunk))
    return CalibrationStats(observers, reservoir.sample(), None, len(obs), time.perf_counter() - t0,
                            {"source": "observations", "samples": len(obs)})
