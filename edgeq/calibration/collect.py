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
from edgeq.deploy.history import ObservationHistory
from edgeq.deploy.runtime import OrtPolicy
from edgeq.graph.analysis import find_activation_matmuls, find_weighted_layers
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
                rows = np.asarray(rng.random(out.shape[0]) < self.epsilon)
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


#: States kept from calibration rollouts for the stages that need states, not statistics
#: (second-pass statistics of rewritten tensors, AdaRound, bias correction). 16k states of a
#: 376-dim observation are 24 MiB; HalfCheetah's 17 dims take 1.1 MiB.
DEFAULT_RESERVOIR = 16384
#: Held-out states (from episodes the observers never saw) used to score per-layer choices.
DEFAULT_HOLDOUT_RESERVOIR = 4096


@dataclass
class CalibrationStats:
    """What calibration produced: one observer per quantizable tensor, plus provenance.

    ``observations`` is a uniform sample of the calibration states; ``holdout`` (possibly empty)
    a sample of states from held-out episodes that no observer saw.
    """

    observers: dict[str, TensorObserver]
    observations: np.ndarray
    episodes: EpisodeResults | None
    steps: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    holdout: np.ndarray | None = None

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": round(self.seconds, 3), **self.settings,
                "float_returns_during_calibration": (
                    None if self.episodes is None else [round(float(r), 3) for r in self.episodes.returns])}


def calibration_tensors(model: onnx.ModelProto) -> list[str]:
    """The tensors whose ranges INT8 needs: the data input of each weighted layer and both inputs of
    each MatMul of two activations (deduplicated)."""
    seen: list[str] = []
    for layer in find_weighted_layers(model):
        if layer.input not in seen:
            seen.append(layer.input)
    for mm in find_activation_matmuls(model):
        for t in mm.inputs:
            if t not in seen:
                seen.append(t)
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
        self.runtime = _runtime(instrumented(policy.model, tensors), policy)
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
            v = self._last[name][rows]
            self.observers[name].update(layer_rows(v, n))
        self.reservoir.add(_graph_input(self.runtime, obs)[rows])


def _runtime(model: onnx.ModelProto, policy: FloatPolicy) -> Any:
    """The float policy as a rollout runtime; a history policy's runtime keeps its observation window."""
    rt = OrtPolicy(model.SerializeToString(), state=[s.to_json() for s in policy.state])
    if policy.history is None:
        return rt
    h = policy.history
    return ObservationHistory(rt, h.length, h.obs_dim, h.input_name, h.reset)


def _graph_input(runtime: Any, obs: np.ndarray) -> np.ndarray:
    """What the graph was fed on the last step: the observations, or a history policy's windows."""
    return runtime.window() if isinstance(runtime, ObservationHistory) else obs


def layer_rows(values: np.ndarray, n: int | None = None) -> np.ndarray:
    """``[n, ...]`` layer inputs as observer rows: one row per token ``[n * tokens, channels]`` for 3-D and
    larger tensors (a Transformer's [batch, steps, features], an im2col [batch, steps, k * channels]),
    so that per-channel statistics are per input feature of the layer, as for 2-D inputs."""
    if values.ndim > 2:
        return values.reshape(-1, values.shape[-1])
    return values.reshape(len(values) if n is None else n, -1)


class _ReservoirHook:
    """Rollout hook that only keeps a sample of the visited states (held-out episodes)."""

    def __init__(self, reservoir: ObservationReservoir, runtime: Any) -> None:
        self.reservoir, self.runtime = reservoir, runtime

    def __call__(self, obs: np.ndarray, actions: np.ndarray, active: np.ndarray) -> None:
        rows = np.asarray(active, bool)
        if rows.any():
            self.reservoir.add(_graph_input(self.runtime, obs)[rows])


def calibrate_rollouts(policy: FloatPolicy, make_env: Callable[[], Any], seeds: Sequence[int], *,
                       noise: ExplorationNoise = ExplorationNoise(), num_envs: int = 8,
                       reservoir_size: int = DEFAULT_RESERVOIR, max_steps_per_episode: int | None = None,
                       holdout_seeds: Sequence[int] = (), holdout_size: int = DEFAULT_HOLDOUT_RESERVOIR,
                       holdout_noise: ExplorationNoise | None = None,
                       progress: Callable[[int], None] | None = None) -> CalibrationStats:
    """Roll ``policy`` out on ``seeds`` and observe every tensor INT8 will quantize.

    ``holdout_seeds`` are further episodes (exploration ``holdout_noise``, default the same as
    ``noise``, on another noise stream) whose states are only sampled into
    ``CalibrationStats.holdout``: the observers never see them, so choices scored on them are
    scored on states the statistics did not come from.
    """
    tensors = calibration_tensors(policy.model)
    observers = {t: TensorObserver(t) for t in tensors}
    reservoir = ObservationReservoir(reservoir_size, policy.input_size, seed=int(seeds[0]) if seeds else 0)
    actor = _ObservingPolicy(policy, tensors, observers, reservoir)
    low, high = policy.action_space.low_array.ravel(), policy.action_space.high_array.ravel()

    t0 = time.perf_counter()
    results = run_episodes(make_env, actor, seeds, num_envs=num_envs, on_step=actor.observe,
                           perturb=noise.make(low, high),
                           noise_seed=int(seeds[0]) if seeds else 0,
                           max_steps_per_episode=max_steps_per_episode, progress=progress)
    holdout: np.ndarray | None = None
    if holdout_seeds:
        held = ObservationReservoir(holdout_size, policy.input_size, seed=int(holdout_seeds[0]))
        plain = _runtime(policy.model, policy)
        run_episodes(make_env, plain, holdout_seeds, num_envs=num_envs, on_step=_ReservoirHook(held, plain),
                     perturb=(noise if holdout_noise is None else holdout_noise).make(low, high),
                     noise_seed=int(holdout_seeds[0]) + 1,
                     max_steps_per_episode=max_steps_per_episode, progress=progress)
        holdout = held.sample()
    seconds = time.perf_counter() - t0
    return CalibrationStats(observers, reservoir.sample(), results, results.steps, seconds,
                            {"source": "rollout", "episodes": len(seeds), "seeds": [int(s) for s in seeds],
                             "holdout_episodes": len(holdout_seeds),
                             "holdout_noise": (noise if holdout_noise is None else holdout_noise).to_json(),
                             "noise": noise.to_json(), "num_envs": num_envs}, holdout)


def tensor_values(model: onnx.ModelProto, states: np.ndarray, tensors: Sequence[str], *,
                  batch_size: int = 4096) -> dict[str, np.ndarray]:
    """Run ``model`` on ``states`` and return the named tensors, ``[len(states), ...]`` each."""
    runtime = OrtPolicy(instrumented(model, tensors).SerializeToString())
    chunks: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    x = np.ascontiguousarray(states, np.float32)
    for i in range(0, len(x), batch_size):
        out = runtime.run(x[i:i + batch_size], list(tensors))
        for t in tensors:
            chunks[t].append(out[t])
    return {t: np.concatenate(v, axis=0) if v else np.zeros((0,), np.float32) for t, v in chunks.items()}


def observe_states(model: onnx.ModelProto, states: np.ndarray, tensors: Sequence[str] | None = None, *,
                   batch_size: int = 4096) -> dict[str, TensorObserver]:
    """Second-pass statistics: observers of ``tensors`` (default: every calibration tensor) on ``states``.

    Used for tensors that a float rewrite changed (static CrossQuant, equalization): the stored
    calibration states are run through the rewritten float graph.
    """
    names = list(tensors) if tensors is not None else calibration_tensors(model)
    observers = {t: TensorObserver(t) for t in names}
    x = np.ascontiguousarray(states, np.float32)
    runtime = OrtPolicy(instrumented(model, names).SerializeToString())
    for i in range(0, len(x), batch_size):
        out = runtime.run(x[i:i + batch_size], names)
        for t in names:
            v = out[t]
            observers[t].update(layer_rows(v, v.shape[0]))
    return observers


def calibrate_observations(policy: FloatPolicy, observations: np.ndarray, *, batch_size: int = 256,
                           reservoir_size: int = DEFAULT_RESERVOIR,
                           progress: Callable[[int], None] | None = None) -> CalibrationStats:
    """Offline calibration from logged observations [N, obs_dim] (stateless policies).

    ``progress(n)`` is called with the number of observations processed since the last call.
    """
    obs = np.asarray(observations, np.float32).reshape(len(observations), -1)
    if policy.history is not None:
        from edgeq.errors import EdgeqError

        raise EdgeqError("calibration from logged observations needs a policy of one observation; this one reads "
                         f"a history of {policy.history.length} (calibrate with rollouts: --env)")
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
