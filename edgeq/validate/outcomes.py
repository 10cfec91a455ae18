"""How an episode ended: success, failure or time-out.

gymnasium ends an episode either by ``truncated`` (the time limit) or ``terminated`` (the task's
own end). A termination is a *failure* for tasks whose termination means falling (Hopper,
Walker2d, Ant, Humanoid, a legged robot): that is the default rule, ``terminated``. Some tasks
also terminate on success (BipedalWalker reaches the end of its course; its falls end with reward
−100): a *failure predicate* on the last step tells them apart, given by a recipe's ``failure``
key or ``--failure``:

* ``terminated`` (default): a termination is a failure, a time-out is a time-out;
* ``none``: the task has no failures (every episode end is a success or a time-out);
* a predicate on the last step: ``reward<=-100``, ``reward < -50``, ``info.fell``,
  ``info.is_success==0``, ``not info.is_success``: an episode whose last step satisfies it is a
  failure (whether it terminated or timed out); otherwise a termination is a success and a
  truncation a time-out.

Comparisons: ``<=``, ``<``, ``>=``, ``>``, ``==``, ``!=`` against a number; ``info.KEY`` alone is
true when the key is present and truthy. The rule is plain data (picklable), so rollouts in worker
processes can apply it.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeq.errors import EdgeqError

SUCCESS, FAILURE, TIMEOUT = "success", "failure", "timeout"
OUTCOMES = (SUCCESS, FAILURE, TIMEOUT)

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<": operator.lt, ">": operator.gt}
_PRED = re.compile(r"^\s*(not\s+)?(reward|info\.[A-Za-z_][\w.]*)\s*(?:(<=|>=|==|!=|<|>)\s*([-+]?[\w.]+))?\s*$")


@dataclass(frozen=True)
class FailureRule:
    """Which episode ends count as failures (see the module docstring for ``spec``)."""

    spec: str = "terminated"

    def __post_init__(self) -> None:
        if self.spec not in ("terminated", "none"):
            self._parse()

    def _parse(self) -> tuple[bool, str, str | None, float | None]:
        m = _PRED.match(self.spec)
        if not m:
            raise EdgeqError(f"--failure {self.spec!r}: expected 'terminated', 'none' or a predicate on the last "
                             "step such as 'reward<=-100', 'info.fell' or 'not info.is_success'")
        negate, subject, op, value = bool(m.group(1)), m.group(2), m.group(3), m.group(4)
        number = None
        if op is not None:
            try:
                number = float(value) if value not in ("true", "True", "false", "False") else float(
                    value in ("true", "True"))
            except ValueError:
                raise EdgeqError(f"--failure {self.spec!r}: {value!r} is not a number") from None
        elif subject == "reward":
            raise EdgeqError(f"--failure {self.spec!r}: compare the reward with a number, e.g. 'reward<=-100'")
        return negate, subject, op, number

    @property
    def declared(self) -> bool:
        """The user said what a failure is (a predicate): failures are possible from the first episode."""
        return self.spec not in ("terminated", "none")

    @property
    def needs_info(self) -> bool:
        return self.declared and "info." in self.spec

    def outcome(self, terminated: bool, truncated: bool, reward: float, info: Mapping[str, Any] | None) -> str:
        """``success``, ``failure`` or ``timeout`` for an episode whose last step had these values."""
        if self.spec == "terminated":
            return FAILURE if terminated else TIMEOUT
        if self.spec != "none" and self._holds(reward, info or {}):
            return FAILURE
        return SUCCESS if terminated else TIMEOUT

    def _holds(self, reward: float, info: Mapping[str, Any]) -> bool:
        negate, subject, op, number = self._parse()
        if subject == "reward":
            value: Any = reward
        else:
            value = info
            for part in subject.split(".")[1:]:
                value = value.get(part) if isinstance(value, Mapping) else None
        if op is None:
            result = bool(np.asarray(value).any()) if value is not None else False
        elif value is None:
            result = False
        else:
            try:
                v = float(np.asarray(value, np.float64).reshape(-1)[0])
            except (TypeError, ValueError):
                return False
            result = not math.isnan(v) and _OPS[op](v, float(number))  # type: ignore[arg-type]
        return result != negate

    def describe(self) -> str:
        if self.spec == "terminated":
            return "a termination (not a time-out) is a failure"
        if self.spec == "none":
            return "no episode end is a failure"
        return f"an episode whose last step has {self.spec} is a failure; other terminations are successes"

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.spec, "meaning": self.describe()}


def parse_failure(spec: str | FailureRule | None) -> FailureRule:
    """``None`` → the default rule (a termination is a failure)."""
    if isinstance(spec, FailureRule):
        return spec
    return FailureRule((spec or "terminated").strip())


def outcome_counts(outcomes: list[str] | tuple[str, ...]) -> dict[str, int]:
    """``{"success": a, "failure": b, "timeout": c}``."""
    return {k: sum(1 for o in outcomes if o == k) for k in OUTCOMES}
