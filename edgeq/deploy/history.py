"""Observation history carried by the runtime, like recurrent state, so ``act(obs)`` takes one observation.

A history policy's graph reads the last ``length`` observations as one input ``obs_history``
[batch, length * obs_dim], flattened **oldest first** (row ``length - 1`` is the current
observation). Before an episode has produced ``length`` observations the missing older rows are
filled as the policy was trained (``reset``):

* ``"zeros"`` (default): SB3's ``VecFrameStack`` convention, the same as recurrent state at an
  episode start; the fixtures in ``tests/fixtures/policies/`` were trained with it
  (``scripts/make_history_fixtures.py`` uses this class);
* ``"first-observation"``: the episode's first observation fills every row (what many deployed
  humanoid policies do: the history starts as ``length`` copies of the first observation, then
  shifts as usual).

:meth:`ObservationHistory.reset` starts new episodes for the rows in its mask.

The manifest describes it as ``io.history`` = ``{"input", "length", "obs_dim", "layout", "reset"}``
(``docs/bundle-format.md``). Only numpy is imported here.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgeq.errors import InputError

#: How the window is laid out in the graph input, and what fills it at an episode start.
LAYOUT = "oldest-first, flattened [batch, length * obs_dim]"
RESET = "zeros"
FIRST_OBSERVATION = "first-observation"
#: The values of ``io.history.reset`` this runtime honours.
RESET_MODES = (RESET, FIRST_OBSERVATION)


def check_reset(reset: str) -> str:
    """``reset`` if it is one of :data:`RESET_MODES`, else an :class:`InputError` naming them."""
    if reset not in RESET_MODES:
        raise InputError(f"history reset {reset!r}; expected one of {', '.join(map(repr, RESET_MODES))}")
    return reset


class HistoryBuffer:
    """The last ``length`` observations per batch row: ``push(obs)`` returns the window to feed.

    ``reset`` says what fills a new episode's window before it has ``length`` observations
    (``"zeros"``, or ``"first-observation"``: its first observation repeated).
    """

    def __init__(self, length: int, obs_dim: int, reset: str = RESET) -> None:
        if length < 1 or obs_dim < 1:
            raise ValueError(f"history length and obs_dim must be >= 1, got {length}, {obs_dim}")
        self.length, self.obs_dim = int(length), int(obs_dim)
        self.reset_mode = check_reset(reset)
        self._buf = np.zeros((0, self.length, self.obs_dim), np.float32)
        self._fresh = np.zeros(0, bool)  # rows whose next push starts an episode

    def push(self, obs: np.ndarray) -> np.ndarray:
        """Append ``obs`` [batch, obs_dim] as the newest row; returns ``[batch, length * obs_dim]`` float32."""
        obs = np.asarray(obs, np.float32).reshape(len(obs), -1)
        if obs.shape[1] != self.obs_dim:
            raise InputError(f"observation has {obs.shape[1]} features; the history holds {self.obs_dim}")
        if self._buf.shape[0] != obs.shape[0]:
            self._buf = np.zeros((obs.shape[0], self.length, self.obs_dim), np.float32)
            self._fresh = np.ones(obs.shape[0], bool)
        self._buf[:, :-1] = self._buf[:, 1:].copy()
        self._buf[:, -1] = obs
        if self.reset_mode == FIRST_OBSERVATION and self._fresh.any():
            self._buf[self._fresh] = obs[self._fresh][:, None, :]
        self._fresh[:] = False
        return self.window()

    def window(self) -> np.ndarray:
        """The current windows, ``[batch, length * obs_dim]`` (a copy)."""
        return self._buf.reshape(self._buf.shape[0], -1).copy()

    def reset(self, mask: np.ndarray | None = None) -> None:
        """Start new episodes in the rows in ``mask`` (all rows, forgetting the batch size, if None): their
        windows are zeroed, and with ``"first-observation"`` filled by their next observation."""
        if mask is None:
            self._buf = np.zeros((0, self.length, self.obs_dim), np.float32)
            self._fresh = np.zeros(0, bool)
        elif self._buf.shape[0]:
            rows = np.asarray(mask, bool)
            self._buf[rows] = 0.0
            self._fresh[rows] = True


class ObservationHistory:
    """Wrap a runtime whose graph reads ``obs_history``: ``act(obs)``/``run(obs)`` take one observation.

    Everything else (``latency``, ``providers``, ``output_names``...) is the wrapped runtime's.
    ``state_specs`` lists the history as one more state entry (``{"history": True, ...}``), so code
    that steps stateful policies one observation at a time does so here too. Calls are serialized
    by a lock; like recurrent state, one history belongs to one episode stream (or batch).
    """

    def __init__(self, runtime: Any, length: int, obs_dim: int, input_name: str = "obs", reset: str = RESET) -> None:
        self.runtime = runtime
        self.history = HistoryBuffer(length, obs_dim, reset)
        self.input_name = input_name
        self._history_lock = threading.Lock()

    @property
    def state_specs(self) -> list[dict[str, Any]]:
        return [*getattr(self.runtime, "state_specs", []),
                {"history": True, "input": self.input_name, "output": None,
                 "shape": [self.history.length, self.history.obs_dim]}]

    def act(self, obs: np.ndarray) -> np.ndarray:
        with self._history_lock:
            return np.asarray(self.runtime.act(self.history.push(obs)))

    def run(self, obs: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        with self._history_lock:
            return dict(self.runtime.run(self.history.push(obs), outputs))

    def window(self) -> np.ndarray:
        """The windows fed by the last call, ``[batch, length * obs_dim]``."""
        return self.history.window()

    def reset(self, mask: np.ndarray | None = None) -> None:
        with self._history_lock:
            self.history.reset(mask)
            self.runtime.reset(mask)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runtime, name)


def history_spec(io: Mapping[str, Any]) -> dict[str, Any] | None:
    """The manifest's ``io.history`` (or None), checked."""
    h = io.get("history")
    if h is None:
        return None
    if not isinstance(h, Mapping) or not isinstance(h.get("length"), int) or not isinstance(h.get("obs_dim"), int):
        raise InputError(f"io.history is {h!r}; expected {{input, length, obs_dim, layout, reset}} with integer "
                         "length and obs_dim")
    if h.get("reset", RESET) not in RESET_MODES:
        raise InputError(f"io.history.reset is {h.get('reset')!r}; this runtime supports "
                         f"{', '.join(map(repr, RESET_MODES))}")
    return dict(h)


def with_history(runtime: Any, io: Mapping[str, Any]) -> Any:
    """``runtime`` wrapped in an :class:`ObservationHistory` when ``io`` has a ``history`` entry."""
    h = history_spec(io)
    return runtime if h is None else ObservationHistory(runtime, h["length"], h["obs_dim"], str(h.get("input", "obs")),
                                                        str(h.get("reset", RESET)))


def episode_windows(observations: np.ndarray, length: int, reset: str = RESET) -> np.ndarray:
    """The windows a history policy sees along one episode's observations ``[T, obs_dim]``.

    Returns ``[T, length * obs_dim]``, what the runtime feeds: before the episode start, zeros or
    (``reset="first-observation"``) the first observation.
    """
    obs = np.asarray(observations, np.float32).reshape(len(observations), -1)
    pad = np.zeros((length - 1, obs.shape[1]), np.float32)
    if check_reset(reset) == FIRST_OBSERVATION and len(obs):
        pad[:] = obs[0]
    padded = np.concatenate([pad, obs])
    return np.stack([padded[t:t + length].reshape(-1) for t in range(len(obs))]) if len(obs) else \
        np.zeros((0, length * obs.shape[1]), np.float32)
