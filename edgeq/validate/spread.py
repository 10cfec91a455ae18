"""Validation rollouts spread over an :class:`~edgeq.validate.executor.Executor`, shard by shard.

The paired float/INT8 rollouts (:func:`run_paired_spread`) and the noisy float re-rolls of the
noise floor and the sensitivity curve (:func:`perturbed_returns_spread`) cut their seeds into shards
(:func:`~edgeq.validate.executor.shards`); each shard is a picklable task that builds its runtimes
from :class:`~edgeq.validate.targets.RuntimeSpec` in whatever process runs it. Results are merged
in shard order, so they are the same, bit for bit, for every executor and number of workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeq.calibration.collect import ExplorationNoise
from edgeq.rollout import EpisodeOutcome, run_episodes
from edgeq.validate.executor import DEFAULT_SHARD_SIZE, Executor, SerialExecutor, shards
from edgeq.validate.paired import PairedRun, merge_paired, run_paired
from edgeq.validate.targets import RuntimeSpec, runtime_for


@dataclass(frozen=True)
class PairedShard:
    """One task of a spread paired run: both policies on ``seeds`` (picklable: see :mod:`executor`)."""

    make_env: Callable[[], Any]
    reference: RuntimeSpec
    candidate: RuntimeSpec
    seeds: tuple[int, ...]
    num_envs: int
    act_dim: int
    action_scale: tuple[float, ...] | None
    record: bool
    outcome: EpisodeOutcome | None = None  # e.g. a FailureRule (a frozen dataclass: picklable)


def run_paired_shard(shard: PairedShard) -> PairedRun:
    """:func:`run_paired` for one shard, with the runtimes built (and cached) in this process."""
    scale = None if shard.action_scale is None else np.asarray(shard.action_scale, np.float64)
    return run_paired(shard.make_env, runtime_for(shard.reference, 0), runtime_for(shard.candidate, 0),
                      runtime_for(shard.reference, 1), runtime_for(shard.candidate, 1), list(shard.seeds),
                      num_envs=shard.num_envs, act_dim=shard.act_dim, action_scale=scale, record=shard.record,
                      outcome=shard.outcome)


def run_paired_spread(make_env: Callable[[], Any], reference: RuntimeSpec, candidate: RuntimeSpec,
                      seeds: Sequence[int], *, act_dim: int, num_envs: int = 8,
                      action_scale: np.ndarray | None = None, record: bool = True,
                      executor: Executor | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                      progress: Callable[[int], None] | None = None,
                      outcome: EpisodeOutcome | None = None) -> PairedRun:
    """:func:`run_paired` with the seeds cut into shards that ``executor`` runs (serially by default).

    The result is the same, bit for bit, whichever executor and however many workers run it: the
    shards depend only on ``seeds`` and ``shard_size`` and are merged in order. ``progress`` is
    called with the env steps of a shard when it finishes.
    """
    ex: Executor = executor if executor is not None else SerialExecutor()
    scale = None if action_scale is None else tuple(float(x) for x in np.asarray(action_scale).ravel())
    tasks = [PairedShard(make_env, reference, candidate, tuple(part), num_envs, act_dim, scale, record, outcome)
             for part in shards(seeds, shard_size)]
    t0 = time.perf_counter()

    def done(_: int, run: PairedRun) -> None:
        if progress is not None:
            progress(int(run.reference.steps + run.candidate.steps))

    runs = ex.map(run_paired_shard, tasks, on_done=done)
    merged = merge_paired(runs)
    merged.seconds = time.perf_counter() - t0
    return merged


@dataclass(frozen=True)
class PerturbedShard:
    """One task of :func:`perturbed_returns_spread`: draw ``draw`` of ``policy`` on ``seeds`` (picklable)."""

    make_env: Callable[[], Any]
    policy: RuntimeSpec
    seeds: tuple[int, ...]
    sigma: float
    low: tuple[float, ...]
    high: tuple[float, ...]
    num_envs: int
    noise_seed: tuple[int, int]


def run_perturbed_shard(shard: PerturbedShard) -> np.ndarray:
    """Returns of one shard under action noise, with the runtime built (and cached) in this process."""
    perturb = ExplorationNoise(gaussian=float(shard.sigma)).make(np.asarray(shard.low, np.float32),
                                                                 np.asarray(shard.high, np.float32))
    res = run_episodes(shard.make_env, runtime_for(shard.policy, 0), list(shard.seeds), num_envs=shard.num_envs,
                       perturb=perturb, noise_seed=list(shard.noise_seed))
    return np.asarray(res.returns, np.float64)


def perturbed_returns_spread(make_env: Callable[[], Any], policy: RuntimeSpec, seeds: Sequence[int], *,
                             sigma: float, draws: int, low: np.ndarray, high: np.ndarray, num_envs: int = 8,
                             draw_seed: int = 0, executor: Executor | None = None,
                             shard_size: int = DEFAULT_SHARD_SIZE,
                             progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Like :func:`perturbed_returns`, with every (draw, shard of seeds) a task that ``executor`` runs.

    Shard ``j`` of draw ``k`` draws its noise from ``default_rng([draw_seed + k, j])``, so the result
    does not depend on the executor or the number of workers.
    """
    ex: Executor = executor if executor is not None else SerialExecutor()
    parts = shards(seeds, shard_size)
    lo = tuple(float(x) for x in np.asarray(low).ravel())
    hi = tuple(float(x) for x in np.asarray(high).ravel())
    tasks = [PerturbedShard(make_env, policy, tuple(part), float(sigma), lo, hi, num_envs, (draw_seed + k, j))
             for k in range(draws) for j, part in enumerate(parts)]

    def done(i: int, returns: np.ndarray) -> None:
        if progress is not None:
            progress(int(len(returns)))

    results = ex.map(run_perturbed_shard, tasks, on_done=done)
    out = np.zeros((draws, len(seeds)))
    for k in range(draws):
        out[k] = np.concatenate(results[k * len(parts):(k + 1) * len(parts)]) if parts else []
    return out
