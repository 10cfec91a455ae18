"""Float and quantized policies rolled out on the same seeds, with action error on visited states."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeq.rollout import BatchPolicy, EpisodeOutcome, EpisodeResults, run_episodes
from edgeq.validate.outcomes import outcome_counts
from edgeq.validate.rates import paired_rate_difference, termination_stats
from edgeq.validate.stats import ActionErrorAccumulator, describe, paired_difference
from edgeq.validate.trajectories import TrajectoryStore, divergence


class ShadowedPolicy:
    """Acts with ``actor``; runs ``shadow`` on the same observations and records the action error.

    The shadow carries its own recurrent state along the actor's trajectory and is reset with it.
    """

    def __init__(self, actor: BatchPolicy, shadow: BatchPolicy, errors: ActionErrorAccumulator,
                 actor_is_reference: bool) -> None:
        self.actor, self.shadow, self.errors = actor, shadow, errors
        self.actor_is_reference = actor_is_reference
        self._pending: tuple[np.ndarray, np.ndarray] | None = None

    def reset(self, mask: np.ndarray | None = None) -> None:
        self.actor.reset(mask)
        self.shadow.reset(mask)

    def act(self, obs: np.ndarray) -> np.ndarray:
        a = self.actor.act(obs)
        b = self.shadow.act(obs)
        self._pending = (a, b)
        return a

    def observe(self, obs: np.ndarray, actions: np.ndarray, active: np.ndarray) -> None:
        if self._pending is None:
            return
        a, b = self._pending
        rows = np.asarray(active, bool)
        ref, cand = (a, b) if self.actor_is_reference else (b, a)
        self.errors.add(ref[rows], cand[rows])
        for policy in (self.actor, self.shadow):  # e.g. a SaturationMonitor counting quantized tensors
            hook = getattr(policy, "observe_rows", None)
            if hook is not None:
                hook(rows)


def termination_summary(reference: EpisodeResults, candidate: EpisodeResults) -> dict[str, Any]:
    """Early termination (falls) of both policies on the same seeds, and the seeds where they disagree."""
    ref_t, cand_t = np.asarray(reference.terminated, bool), np.asarray(candidate.terminated, bool)
    seeds = np.asarray(reference.seeds)
    return {"float_rate": float(ref_t.mean()), "int8_rate": float(cand_t.mean()),
            "float_mean_length": float(np.mean(reference.lengths)),
            "int8_mean_length": float(np.mean(candidate.lengths)),
            "only_int8_terminated": [int(s) for s in seeds[cand_t & ~ref_t]],
            "only_float_terminated": [int(s) for s in seeds[ref_t & ~cand_t]]}


def outcome_summary(reference: EpisodeResults, candidate: EpisodeResults) -> dict[str, Any]:
    """Success / failure / time-out counts per side and the seeds where only one side failed."""
    ref_f, cand_f = reference.failed, candidate.failed
    seeds = np.asarray(reference.seeds)
    return {"float": outcome_counts(reference.outcomes), "int8": outcome_counts(candidate.outcomes),
            "episodes": len(reference.seeds),
            "only_int8_failed": [int(s) for s in seeds[cand_f & ~ref_f]],
            "only_float_failed": [int(s) for s in seeds[ref_f & ~cand_f]]}


@dataclass
class PairedRun:
    """Everything measured by :func:`run_paired` (arrays kept; :meth:`to_json` gives the summary)."""

    reference: EpisodeResults
    candidate: EpisodeResults
    err_on_reference: ActionErrorAccumulator
    err_on_candidate: ActionErrorAccumulator
    reference_traj: TrajectoryStore | None
    candidate_traj: TrajectoryStore | None
    seconds: float

    def to_json(self) -> dict[str, Any]:
        ref, cand = self.reference, self.candidate
        out: dict[str, Any] = {
            "float": {**ref.to_json(), **describe(ref.returns), **termination_stats(ref.terminated)},
            "int8": {**cand.to_json(), **describe(cand.returns), **termination_stats(cand.terminated)},
            "paired_difference": paired_difference(ref.returns, cand.returns),
            "termination_difference": paired_rate_difference(ref.terminated, cand.terminated),
            "action_error": {"on_float_trajectory": self.err_on_reference.summary(),
                             "on_int8_trajectory": self.err_on_candidate.summary()},
            "termination": termination_summary(ref, cand),
            "outcomes": outcome_summary(ref, cand),
            "seconds": round(self.seconds, 3),
        }
        if self.reference_traj is not None and self.candidate_traj is not None:
            out["divergence"] = divergence(self.reference_traj, self.candidate_traj, ref.seeds)
            fs, cs = self.reference_traj.success, self.candidate_traj.success
            if fs or cs:  # the env reports success (info["is_success"]): rates over the episodes
                out["termination"]["float_success_rate"] = float(np.mean([fs.get(int(s), False) for s in ref.seeds]))
                out["termination"]["int8_success_rate"] = float(np.mean([cs.get(int(s), False) for s in ref.seeds]))
        return out


def run_paired(make_env: Callable[[], Any], reference: BatchPolicy, candidate: BatchPolicy,
               shadow_reference: BatchPolicy, shadow_candidate: BatchPolicy, seeds: Sequence[int], *,
               num_envs: int = 8, act_dim: int, action_scale: np.ndarray | None = None,
               record: bool = True, progress: Callable[[int], None] | None = None,
               outcome: EpisodeOutcome | None = None) -> PairedRun:
    """Roll out ``reference`` (float) and ``candidate`` (quantized) on ``seeds``.

    ``shadow_*`` are second instances of the other policy (with their own state) that measure the
    action error on the states each policy visits. With ``record`` the trajectories of both are
    kept (per seed) for the divergence and the per-layer statistics. ``outcome`` classifies each
    episode's end (success / failure / time-out).
    """
    err_on_ref = ActionErrorAccumulator(act_dim, scale=action_scale)
    err_on_cand = ActionErrorAccumulator(act_dim, scale=action_scale)
    ref_traj = TrajectoryStore() if record else None
    cand_traj = TrajectoryStore() if record else None
    t0 = time.perf_counter()
    ref_pol = ShadowedPolicy(reference, shadow_candidate, err_on_ref, actor_is_reference=True)
    ref_res: EpisodeResults = run_episodes(ref_traj.wrap(make_env) if ref_traj else make_env, ref_pol, seeds,
                                           num_envs=num_envs, on_step=ref_pol.observe, progress=progress,
                                           outcome=outcome)
    cand_pol = ShadowedPolicy(candidate, shadow_reference, err_on_cand, actor_is_reference=False)
    cand_res = run_episodes(cand_traj.wrap(make_env) if cand_traj else make_env, cand_pol, seeds,
                            num_envs=num_envs, on_step=cand_pol.observe, progress=progress, outcome=outcome)
    return PairedRun(ref_res, cand_res, err_on_ref, err_on_cand, ref_traj, cand_traj, time.perf_counter() - t0)


def merge_paired(runs: Sequence[PairedRun]) -> PairedRun:
    """One :class:`PairedRun` from runs on disjoint seed shards, in the given (shard) order."""
    if not runs:
        raise ValueError("merge_paired needs at least one run")
    if len(runs) == 1:
        return runs[0]
    ref_traj = cand_traj = None
    if all(r.reference_traj is not None and r.candidate_traj is not None for r in runs):
        from edgeq.validate.trajectories import TrajectoryStore

        ref_traj = TrajectoryStore.merge([r.reference_traj for r in runs if r.reference_traj is not None])
        cand_traj = TrajectoryStore.merge([r.candidate_traj for r in runs if r.candidate_traj is not None])
    return PairedRun(EpisodeResults.concat([r.reference for r in runs]),
                     EpisodeResults.concat([r.candidate for r in runs]),
                     ActionErrorAccumulator.merge([r.err_on_reference for r in runs]),
                     ActionErrorAccumulator.merge([r.err_on_candidate for r in runs]),
                     ref_traj, cand_traj, float(sum(r.seconds for r in runs)))


def paired_rollouts(make_env: Callable[[], Any], reference: BatchPolicy, candidate: BatchPolicy,
                    shadow_reference: BatchPolicy, shadow_candidate: BatchPolicy, seeds: Sequence[int], *,
                    num_envs: int = 8, act_dim: int,
                    progress: Callable[[int], None] | None = None,
                    outcome: EpisodeOutcome | None = None) -> dict[str, Any]:
    """:func:`run_paired` summarized as JSON (float, int8, paired_difference, action_error, ...)."""
    return run_paired(make_env, reference, candidate, shadow_reference, shadow_candidate, seeds,
                      num_envs=num_envs, act_dim=act_dim, progress=progress, outcome=outcome).to_json()


def action_error_series(reference: Any, candidate: Any, observations: np.ndarray) -> np.ndarray:
    """|a_candidate - a_reference| [T, act_dim] along one episode's observations (state carried).

    ``reference``/``candidate`` are :class:`~edgeq.deploy.runtime.OrtPolicy`-like (``act``,
    ``reset``, ``state_specs``); stateless policies run the whole sequence as one batch.
    """
    obs = np.ascontiguousarray(observations, np.float32)
    if not getattr(reference, "state_specs", None) and not getattr(candidate, "state_specs", None):
        reference.reset(None)
        candidate.reset(None)
        return np.abs(candidate.act(obs).astype(np.float64) - reference.act(obs).astype(np.float64))
    reference.reset(None)
    candidate.reset(None)
    rows = [np.abs(candidate.act(o[None]).astype(np.float64) - reference.act(o[None]).astype(np.float64))[0]
            for o in obs]
    reference.reset(None)
    candidate.reset(None)
    return np.stack(rows)
