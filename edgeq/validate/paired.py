"""Float and quantized policies rolled out on the same seeds, with action error on visited states."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgeq.rollout import BatchPolicy, EpisodeResults, run_episodes
from edgeq.validate.rates import paired_rate_difference, termination_stats
from edgeq.validate.stats import ActionErrorAccumulator, describe, paired_difference


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


def paired_rollouts(make_env: Callable[[], Any], reference: BatchPolicy, candidate: BatchPolicy,
                    shadow_reference: BatchPolicy, shadow_candidate: BatchPolicy, seeds: Sequence[int], *,
                    num_envs: int = 8, act_dim: int,
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Roll out ``reference`` (float) and ``candidate`` (quantized) on ``seeds``.

    ``shadow_*`` are second instances of the other policy (their own state) used to measure the
    action error on the states each policy visits. Each precision reports per-episode ``terminated``
    flags and its ``termination_rate`` with a Wilson 95% interval; ``termination_difference`` is the
    paired int8 - float difference of those rates.
    """
    err_on_ref = ActionErrorAccumulator(act_dim)
    err_on_cand = ActionErrorAccumulator(act_dim)
    t0 = time.perf_counter()
    ref_pol = ShadowedPolicy(reference, shadow_candidate, err_on_ref, actor_is_reference=True)
    ref_res: EpisodeResults = run_episodes(make_env, ref_pol, seeds, num_envs=num_envs, on_step=ref_pol.observe,
                                           progress=progress)
    cand_pol = ShadowedPolicy(candidate, shadow_reference, err_on_cand, actor_is_reference=False)
    cand_res = run_episodes(make_env, cand_pol, seeds, num_envs=num_envs, on_step=cand_pol.observe,
                            progress=progress)
    seconds = time.perf_counter() - t0
    return {
        "float": {**ref_res.to_json(), **describe(ref_res.returns), **termination_stats(ref_res.terminated)},
        "int8": {**cand_res.to_json(), **describe(cand_res.returns), **termination_stats(cand_res.terminated)},
        "paired_difference": paired_difference(ref_res.returns, cand_res.returns),
        "termination_difference": paired_rate_difference(ref_res.terminated, cand_res.terminated),
        "action_error": {"on_float_trajectory": err_on_ref.summary(),
                         "on_int8_trajectory": err_on_cand.summary()},
        "seconds": round(seconds, 3),
    }
