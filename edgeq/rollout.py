"""Episodes on fixed seeds in a gymnasium vector env, shared by calibration and validation.

Each episode ``k`` starts from ``env.reset(seed=seeds[k])``, whatever sub-environment runs it,
so two policies rolled out with the same seeds meet the same initial states (paired comparison),
and results do not depend on how many environments run in parallel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np


class BatchPolicy(Protocol):
    """What the rollout needs of a policy: batched actions and per-row state reset."""

    def act(self, obs: np.ndarray) -> np.ndarray: ...

    def reset(self, mask: np.ndarray | None = None) -> None: ...


#: ``on_step(obs, actions, active)`` sees every batched step; ``active`` marks rows that belong to
#: a counted episode (finished envs idle until the batch ends).
StepHook = Callable[[np.ndarray, np.ndarray, np.ndarray], None]
class EpisodeOutcome(Protocol):
    """Classifies an episode's end (e.g. :class:`edgeq.validate.outcomes.FailureRule`)."""

    @property
    def needs_info(self) -> bool: ...

    def outcome(self, terminated: bool, truncated: bool, reward: float, info: dict[str, Any] | None) -> str: ...


#: ``perturb(actions, rng)`` returns the actions actually sent to the env (exploration noise).
ActionPerturbation = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@dataclass
class EpisodeResults:
    seeds: list[int]
    returns: np.ndarray
    lengths: np.ndarray
    terminated: np.ndarray
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: per episode: "failure" / "success" / "timeout" (see :mod:`edgeq.validate.outcomes`); by default a
    #: termination is a failure and a truncation (time limit) a time-out
    outcomes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.outcomes:
            self.outcomes = ["failure" if t else "timeout" for t in np.asarray(self.terminated, bool)]

    @property
    def failed(self) -> np.ndarray:
        return np.array([o == "failure" for o in self.outcomes], dtype=bool)

    @classmethod
    def concat(cls, parts: Sequence[EpisodeResults]) -> EpisodeResults:
        """The episodes of ``parts`` (disjoint seeds) one after the other, in the given order.

        Every field is joined by its type: lists and arrays concatenated, step counts added, and
        ``extra`` entries joined the same way key by key.
        """
        if not parts:
            raise ValueError("concat needs at least one EpisodeResults")
        if len(parts) == 1:
            return parts[0]
        joined = {f.name: _join([getattr(p, f.name) for p in parts], f.name) for f in fields(cls)}
        return cls(**joined)

    def to_json(self) -> dict[str, Any]:
        return {
            "seeds": [int(s) for s in self.seeds],
            "returns": [float(r) for r in self.returns],
            "lengths": [int(n) for n in self.lengths],
            "terminated": [bool(t) for t in self.terminated],
            "outcomes": list(self.outcomes),
        }


def _check_finite(what: str, values: np.ndarray, active: np.ndarray, slot: np.ndarray, seeds: Sequence[int],
                  lengths: np.ndarray) -> None:
    """Raise :class:`EnvironmentSpecError` naming the episode if an active env gave a NaN/inf ``what``."""
    rows = values.reshape(len(active), -1)
    bad = active & ~np.isfinite(rows).all(axis=1)
    if np.any(bad):
        from edgeq.errors import EnvironmentSpecError

        i = int(np.flatnonzero(bad)[0])
        value = rows[i][~np.isfinite(rows[i])][0]
        raise EnvironmentSpecError(
            f"the env returned a non-finite {what} ({value}) at step {int(lengths[slot[i]])} of the episode with "
            f"seed {seeds[slot[i]]}; fix the env so that every {what} is finite (returns cannot be compared "
            "otherwise)")


def _join(values: list[Any], name: str) -> Any:
    first = values[0]
    if isinstance(first, np.ndarray):
        return np.concatenate(values)
    if isinstance(first, list | tuple):
        return [x for v in values for x in v]
    if isinstance(first, bool) or first is None:
        return first
    if isinstance(first, int | float):
        return type(first)(sum(values))
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for v in values for k in v))
        return {k: _join([v[k] for v in values if k in v], f"{name}.{k}") for k in keys}
    raise TypeError(f"EpisodeResults.concat cannot join field {name!r} of type {type(first).__name__}")


def run_episodes(make_env: Callable[[], Any], policy: BatchPolicy, seeds: Sequence[int], *,
                 num_envs: int = 8, on_step: StepHook | None = None,
                 perturb: ActionPerturbation | None = None, noise_seed: int | Sequence[int] = 0,
                 max_steps_per_episode: int | None = None,
                 progress: Callable[[int], None] | None = None,
                 outcome: EpisodeOutcome | None = None) -> EpisodeResults:
    """Roll ``policy`` out for ``len(seeds)`` episodes; episode ``k`` is reset with ``seeds[k]``.

    ``progress(n)`` is called with the number of env steps taken since the last call. ``outcome``
    classifies each episode's end from its last step (default: a termination is a failure).
    ``noise_seed`` (an int or a sequence of ints) seeds the generator that ``perturb`` draws from.
    """
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode, SyncVectorEnv

    seeds = [int(s) for s in seeds]
    n_env = max(1, min(num_envs, len(seeds)))
    venv = SyncVectorEnv([make_env for _ in range(n_env)], autoreset_mode=AutoresetMode.DISABLED)
    rng = np.random.default_rng(noise_seed)
    returns = np.zeros(len(seeds))
    lengths = np.zeros(len(seeds), dtype=np.int64)
    terminated = np.zeros(len(seeds), dtype=bool)
    outcomes = [""] * len(seeds)
    slot = np.full(n_env, -1)  # which episode each env runs (-1: idle)
    next_ep = 0
    total_steps = 0
    try:
        first = seeds[:n_env]
        obs, _ = venv.reset(seed=first + [None] * (n_env - len(first)))
        slot[: len(first)] = np.arange(len(first))
        next_ep = len(first)
        policy.reset(None)
        while np.any(slot >= 0):
            active = slot >= 0
            obs32 = np.asarray(obs, dtype=np.float32)
            _check_finite("observation", obs32, active, slot, seeds, lengths)
            actions = np.asarray(policy.act(obs32), dtype=np.float32)
            if on_step is not None:
                on_step(obs32, actions, active)
            sent = perturb(actions, rng) if perturb is not None else actions
            obs, reward, term, trunc, infos = venv.step(sent.astype(venv.single_action_space.dtype))
            _check_finite("reward", np.asarray(reward, dtype=np.float64), active, slot, seeds, lengths)
            total_steps += int(active.sum())
            if progress is not None:
                progress(int(active.sum()))
            done_mask = np.zeros(n_env, dtype=bool)
            for i in np.flatnonzero(active):
                k = slot[i]
                returns[k] += float(reward[i])
                lengths[k] += 1
                over = max_steps_per_episode is not None and lengths[k] >= max_steps_per_episode
                if term[i] or trunc[i] or over:
                    terminated[k] = bool(term[i])
                    done_mask[i] = True
                    if outcome is None:
                        outcomes[k] = "failure" if term[i] else "timeout"
                    else:
                        info = env_info_row(infos, int(i)) if outcome.needs_info else None
                        outcomes[k] = outcome.outcome(bool(term[i]), not bool(term[i]), float(reward[i]), info)
            idle_done = (~active) & (term | trunc)
            reset_mask = done_mask | idle_done
            if np.any(reset_mask):
                new_seeds: list[int | None] = [None] * n_env
                for i in np.flatnonzero(done_mask):
                    if next_ep < len(seeds):
                        slot[i] = next_ep
                        new_seeds[i] = seeds[next_ep]
                        next_ep += 1
                    else:
                        slot[i] = -1
                obs, _ = venv.reset(seed=new_seeds, options={"reset_mask": reset_mask})
                policy.reset(reset_mask)
    finally:
        venv.close()
    del gym
    return EpisodeResults(seeds, returns, lengths, terminated, total_steps, outcomes=outcomes)


def env_info_row(infos: Any, i: int) -> dict[str, Any]:
    """Sub-environment ``i``'s info from a gymnasium vector env's batched info dict."""
    out: dict[str, Any] = {}
    for key, value in dict(infos or {}).items():
        if key.startswith("_"):
            continue
        mask = infos.get(f"_{key}")
        if mask is not None and not bool(np.asarray(mask)[i]):
            continue
        if isinstance(value, dict):
            out[key] = env_info_row(value, i)
        else:
            try:
                out[key] = value[i]
            except (TypeError, IndexError, KeyError):
                out[key] = value
    return out
