"""Making environments from a gymnasium id or a user's ``module:callable`` entry point."""

from __future__ import annotations

import difflib
import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgeq.errors import EnvironmentSpecError
from edgeq.spaces import BoxSpec


def parse_env_kwargs(text: str | None) -> dict[str, Any]:
    """``--env-kwargs`` JSON → dict, with a clear error."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EnvironmentSpecError(f"--env-kwargs is not valid JSON ({exc}); expected an object such as "
                                   "'{\"frame_skip\": 2}'") from None
    if not isinstance(value, dict):
        raise EnvironmentSpecError(f"--env-kwargs must be a JSON object, got {type(value).__name__}")
    return value


_MUJOCO_WARNINGS: set[str] = set()


def _route_mujoco_warnings() -> None:
    """Send MuJoCo's C-level warnings (printed once per env made) through Python's ``warnings``, once each.

    MuJoCo 4 prints a deprecation warning every time it compiles HalfCheetah's XML; a calibration
    that makes many envs would bury the summary under identical lines.
    """
    try:
        import mujoco
    except ImportError:
        return

    def handler(message: str) -> None:
        if message not in _MUJOCO_WARNINGS:
            _MUJOCO_WARNINGS.add(message)
            import warnings

            if "deprecated" in message:  # MuJoCo's notes on its own XML attributes: not the user's concern
                logging.getLogger("edgeq").info("MuJoCo: %s", message)
            else:
                warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)

    mujoco.set_mju_user_warning(handler)


@dataclass(frozen=True)
class EnvFactory:
    """Makes the env ``env`` (a gymnasium id or ``module:callable``) with ``kwargs``.

    A plain, picklable value (unlike a lambda), so worker processes and Ray tasks can make the
    same env (:mod:`edgeq.validate.executor`). Build it with :func:`env_factory`, which checks the id.
    """

    env: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def __call__(self) -> Any:
        """The env; a failure to make it (an exception, unknown kwargs, a value that is not an env) is an
        :class:`EnvironmentSpecError` naming the env."""
        env, kwargs = self.env, dict(self.kwargs)
        try:
            made = self._make(kwargs)
        except EnvironmentSpecError:
            raise
        except TypeError as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            if kwargs and "keyword argument" in first:
                raise EnvironmentSpecError(f"--env {env!r} does not take these --env-kwargs {sorted(kwargs)}: "
                                           f"{first}; remove or rename them") from None
            raise EnvironmentSpecError(f"--env {env!r}: making the env raised TypeError: {first}; fix the env "
                                       "factory") from None
        except Exception as exc:  # noqa: BLE001 - a user's env factory may raise anything
            first = (str(exc).strip().splitlines() or [""])[0]
            raise EnvironmentSpecError(f"--env {env!r}: making the env raised {type(exc).__name__}: {first}; "
                                       "fix the env (or its --env-kwargs)") from None
        if not all(hasattr(made, a) for a in ("reset", "step", "observation_space", "action_space")):
            raise EnvironmentSpecError(f"--env {env!r} returned {type(made).__name__} {str(made)[:60]!r}; expected a "
                                       "gymnasium.Env (with reset, step, observation_space and action_space)")
        return made

    def _make(self, kwargs: dict[str, Any]) -> Any:
        import gymnasium as gym

        if ":" in self.env and self.env not in gym.envs.registry:
            module_name, _, attr = self.env.partition(":")
            return getattr(importlib.import_module(module_name), attr)(**kwargs)
        _route_mujoco_warnings()
        return gym.make(self.env, **kwargs)


def env_factory(env: str, env_kwargs: dict[str, Any] | None = None) -> Callable[[], Any]:
    """A zero-argument function that makes the env.

    ``env`` is a registered gymnasium id (``HalfCheetah-v5``) or ``module:callable``, a Python entry
    point returning a ``gymnasium.Env`` (the way to bring a user's own simulator).
    """
    import gymnasium as gym

    _route_mujoco_warnings()
    kwargs = dict(env_kwargs or {})
    if ":" in env and env not in gym.envs.registry:
        module_name, _, attr = env.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise EnvironmentSpecError(f"--env {env!r}: cannot import module {module_name!r}: {exc}") from None
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise EnvironmentSpecError(f"--env {env!r}: {module_name} has no callable {attr!r} "
                                       "(expected module:callable returning a gymnasium.Env)")
        return EnvFactory(env, tuple(sorted(kwargs.items())))
    if env not in gym.envs.registry:
        close = difflib.get_close_matches(env, list(gym.envs.registry), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise EnvironmentSpecError(f"environment id {env!r} is not registered in gymnasium{hint} "
                                   "(expected a gymnasium id such as 'HalfCheetah-v5' or module:callable)")
    return EnvFactory(env, tuple(sorted(kwargs.items())))


def check_env_matches(env_name: str, observation_space: Any, action_space: Any,
                      obs_spec: BoxSpec, act_spec: BoxSpec) -> None:
    """Raise if the env's spaces do not fit the policy's."""
    for what, space, spec, verb in (("observation", observation_space, obs_spec, "expects"),
                                    ("action", action_space, act_spec, "produces")):
        if type(space).__name__ != "Box":
            raise EnvironmentSpecError(f"env {env_name!r} has a {type(space).__name__} {what} space; "
                                       "expected a Box")
        if tuple(space.shape) != tuple(spec.shape):
            raise EnvironmentSpecError(f"env {env_name!r} {what}s have shape {tuple(space.shape)} but the "
                                       f"policy {verb} {tuple(spec.shape)}")
