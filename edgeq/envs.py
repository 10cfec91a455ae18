"""Making environments from a gymnasium id or a user's ``module:callable`` entry point."""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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


#: Packages whose gymnasium wrappers edgeq applies when a training config names them (RL Zoo's
#: ``env_wrapper``, ``--env-wrapper``). Importing a class a file names runs that module's code, so
#: only these trusted, installed packages are imported.
WRAPPER_PACKAGES = ("sb3_contrib.common.wrappers.", "gymnasium.wrappers.")


@dataclass(frozen=True)
class WrapperSpec:
    """A gymnasium wrapper applied to every env made: its class path and keyword arguments."""

    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"class": self.path, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WrapperSpec:
        return cls(str(d["class"]), dict(d.get("kwargs") or {}))

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def resolve(self) -> Callable[..., Any]:
        if not self.path.startswith(WRAPPER_PACKAGES):
            raise EnvironmentSpecError(
                f"env wrapper {self.path!r} is not one edgeq imports (it applies wrappers from "
                f"{', '.join(p.rstrip('.') for p in WRAPPER_PACKAGES)}); wrap the env in your own code and pass "
                "--env module:callable")
        module_name, _, attr = self.path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise EnvironmentSpecError(f"env wrapper {self.path!r} cannot be imported ({exc}); install the package "
                                       "that provides it (e.g. pip install sb3-contrib)") from None
        return cls  # type: ignore[no-any-return]


def parse_wrapper(text: str) -> WrapperSpec:
    """``--env-wrapper`` text: a class path, optionally with JSON kwargs after ``:`` (``X:{"max_steps": 500}``)."""
    path, sep, rest = text.partition(":")
    kwargs: dict[str, Any] = {}
    if sep:
        try:
            kwargs = json.loads(rest)
        except json.JSONDecodeError:
            kwargs = None  # type: ignore[assignment]
        if not isinstance(kwargs, dict):
            raise EnvironmentSpecError(f"--env-wrapper {text!r}: after ':' expected a JSON object of keyword "
                                       "arguments, e.g. 'sb3_contrib.common.wrappers.TimeFeatureWrapper:"
                                       "{\"max_steps\": 1000}'")
    if path == "TimeFeatureWrapper":
        path = "sb3_contrib.common.wrappers.TimeFeatureWrapper"
    return WrapperSpec(path, kwargs)


def _stack_frames(env: Any, n: int, pad: np.ndarray | None) -> Any:
    """SB3's ``VecFrameStack`` on one env: the last ``n`` observations, oldest first, concatenated.

    After a reset the older slots hold ``pad`` (SB3 pads with zeros *after* VecNormalize; the raw
    value that normalizes to zero is VecNormalize's mean, so pad with it when the graph normalizes).
    """
    import gymnasium as gym

    class StackFrames(gym.Wrapper):  # type: ignore[misc]
        def __init__(self, inner: Any) -> None:
            super().__init__(inner)
            box = inner.observation_space
            self._pad = np.zeros(box.shape, box.dtype) if pad is None else np.asarray(pad, box.dtype)
            self.observation_space = gym.spaces.Box(np.tile(box.low, n), np.tile(box.high, n), dtype=box.dtype)
            self._frames: list[np.ndarray] = []

        def _obs(self) -> np.ndarray:
            return np.concatenate(self._frames[-n:])

        def reset(self, **kwargs: Any) -> Any:
            obs, info = self.env.reset(**kwargs)
            self._frames = [self._pad] * (n - 1) + [np.asarray(obs)]
            return self._obs(), info

        def step(self, action: Any) -> Any:
            obs, reward, terminated, truncated, info = self.env.step(action)
            self._frames = self._frames[1 - n:] + [np.asarray(obs)] if n > 1 else [np.asarray(obs)]
            return self._obs(), reward, terminated, truncated, info

    return StackFrames(env)


def _import_entry_point(env: str) -> Any:
    """``module:callable`` → the callable; the module is looked up from the current directory too."""
    module_name, _, attr = env.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # the console script's sys.path lacks it (python -m has it)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EnvironmentSpecError(f"--env {env!r}: cannot import module {module_name!r} ({exc}); run edgeq from "
                                   "the directory that holds it or add that directory to PYTHONPATH") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise EnvironmentSpecError(f"--env {env!r}: {module_name} has no callable {attr!r} "
                                   "(expected module:callable returning a gymnasium.Env)")
    return fn


def newer_versions(env: str) -> list[str]:
    """Registered ids with the same namespace and name as ``env`` and a higher version, newest first."""
    import gymnasium as gym

    try:
        spec = gym.spec(env)
    except Exception:  # noqa: BLE001 - an unregistered id: parse it
        ns, name, version = gym.envs.registration.parse_env_id(env)
    else:
        ns, name, version = spec.namespace, spec.name, spec.version
    found = [s for s in gym.envs.registry.values() if s.namespace == ns and s.name == name and s.version is not None
             and (version is None or s.version > version)]
    return [s.id for s in sorted(found, key=lambda s: -(s.version or 0))]


def is_legacy_mujoco(env: str) -> bool:
    """gymnasium's v2/v3 MuJoCo ids: registered, but they need mujoco-py, which gymnasium 1.x dropped."""
    import gymnasium as gym

    if env not in gym.envs.registry:
        return False
    ep = gym.spec(env).entry_point
    return callable(ep) and "mujoco_py" in getattr(ep, "__name__", "")


def _legacy_message(env: str) -> str:
    newer = [v for v in newer_versions(env) if not is_legacy_mujoco(v)]
    use = f"use --env {newer[0]}" + (f" (or {', '.join(newer[1:])})" if newer[1:] else "") if newer else \
        "install gymnasium-robotics and mujoco-py"
    return (f"env {env!r} needs mujoco-py: gymnasium 1.x moved the v2/v3 MuJoCo envs out; {use}, the newer "
            "version of the same robot (edgeq checks that its observations have the policy's shape)")


@dataclass(frozen=True)
class EnvFactory:
    """Makes the env ``env`` (a gymnasium id or ``module:callable``) with ``kwargs``, ``wrappers`` and a frame stack.

    A plain, picklable value (unlike a lambda), so worker processes and Ray tasks can make the
    same env (:mod:`edgeq.validate.executor`). Build it with :func:`env_factory`, which checks the id.
    """

    env: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    wrappers: tuple[WrapperSpec, ...] = ()
    frame_stack: int = 0
    frame_pad: tuple[float, ...] | None = None

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
            return self._wrap(_import_entry_point(self.env)(**kwargs))
        _route_mujoco_warnings()
        try:
            return self._wrap(gym.make(self.env, **kwargs))
        except (ImportError, gym.error.DependencyNotInstalled) as exc:  # name the missing package
            raise EnvironmentSpecError(f"env {self.env!r} cannot be made here: {str(exc).splitlines()[0]}") from None
        except TypeError as exc:
            if "argument" not in str(exc):
                raise
            raise EnvironmentSpecError(f"env {self.env!r} rejects --env-kwargs {json.dumps(kwargs)}: {exc}") from None

    def _wrap(self, env: Any) -> Any:
        for w in self.wrappers:
            env = w.resolve()(env, **w.kwargs)
        if self.frame_stack > 1:
            pad = None if self.frame_pad is None else np.asarray(self.frame_pad, dtype=np.float64)
            env = _stack_frames(env, self.frame_stack, pad)
        return env


def env_factory(env: str, env_kwargs: dict[str, Any] | None = None, wrappers: Sequence[WrapperSpec] = (),
                frame_stack: int = 0, frame_pad: Sequence[float] | None = None) -> EnvFactory:
    """A zero-argument, picklable function that makes the env.

    ``env`` is a registered gymnasium id (``HalfCheetah-v5``) or ``module:callable``, a Python entry
    point returning a ``gymnasium.Env`` (the way to bring a user's own simulator; the module is
    imported from the current directory too). ``wrappers`` are applied in order (RL Zoo's
    ``env_wrapper``), then ``frame_stack`` > 1 stacks that many observations as SB3's VecFrameStack,
    padding with ``frame_pad`` after a reset.
    """
    import gymnasium as gym

    _route_mujoco_warnings()
    for w in wrappers:
        w.resolve()  # a wrapper that cannot be imported fails here, once, with the fix
    factory = EnvFactory(env, tuple(sorted((env_kwargs or {}).items())), tuple(wrappers), int(frame_stack),
                         None if frame_pad is None else tuple(float(v) for v in frame_pad))
    if ":" in env and env not in gym.envs.registry:
        _import_entry_point(env)
        return factory
    if env not in gym.envs.registry:
        close = difflib.get_close_matches(env, list(gym.envs.registry), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise EnvironmentSpecError(f"environment id {env!r} is not registered in gymnasium{hint} "
                                   "(expected a gymnasium id such as 'HalfCheetah-v5' or module:callable)")
    if is_legacy_mujoco(env):
        raise EnvironmentSpecError(_legacy_message(env))
    return factory


def env_factory_for(record: dict[str, Any]) -> Callable[[], Any]:
    """The env a manifest's ``env`` record describes (id, kwargs, wrappers, frame stack)."""
    return env_factory(record["id"], record.get("kwargs"),
                       [WrapperSpec.from_json(w) for w in record.get("wrappers", [])],
                       int(record.get("frame_stack", 0) or 0), record.get("frame_pad"))


def _continuous_hint(env_name: str) -> str:
    """``; pass --env-kwargs '{"continuous": true}'`` when the env class takes a ``continuous`` flag."""
    try:
        import gymnasium as gym

        ep: Any = gym.spec(env_name).entry_point
        if isinstance(ep, str):
            module_name, _, attr = ep.partition(":")
            ep = getattr(importlib.import_module(module_name), attr)
        if "continuous" in inspect.signature(ep).parameters:
            return (f"; {env_name} has a continuous-action version: add --env-kwargs '{{\"continuous\": true}}'")
    except Exception:  # noqa: BLE001 - a hint only
        pass
    return ""


def _observation_hint(env_shape: tuple[int, ...], spec: BoxSpec) -> str:
    """Why a policy may expect more observations than the env gives: a time feature or stacked frames."""
    if len(env_shape) != 1 or len(spec.shape) != 1:
        return ""
    have, want = env_shape[0], spec.shape[0]
    if want == have + 1 and spec.low[-1] == 0.0 and spec.high[-1] == 1.0:
        return ("; the policy's extra last observation lies in [0, 1]: it was trained with TimeFeatureWrapper "
                "(see its RL Zoo config.yml, env_wrapper): quantize the RL Zoo folder (edgeq quantize "
                "logs/ALGO/ENV_1/) or add --env-wrapper TimeFeatureWrapper")
    if have and want % have == 0 and want // have > 1:
        return (f"; {want} = {want // have} x {have}: it was trained on {want // have} stacked frames (RL Zoo "
                f"config.yml frame_stack): quantize the RL Zoo folder or add --frame-stack {want // have}")
    return ""


def check_env_matches(env_name: str, observation_space: Any, action_space: Any,
                      obs_spec: BoxSpec, act_spec: BoxSpec) -> None:
    """Raise if the env's spaces do not fit the policy's."""
    for what, space, spec, verb in (("observation", observation_space, obs_spec, "expects"),
                                    ("action", action_space, act_spec, "produces")):
        if type(space).__name__ != "Box":
            hint = _continuous_hint(env_name) if what == "action" else ""
            raise EnvironmentSpecError(f"env {env_name!r} has a {type(space).__name__} {what} space; "
                                       f"expected a Box{hint}")
        if tuple(space.shape) != tuple(spec.shape):
            hint = _observation_hint(tuple(space.shape), spec) if what == "observation" else ""
            raise EnvironmentSpecError(f"env {env_name!r} {what}s have shape {tuple(space.shape)} but the "
                                       f"policy {verb} {tuple(spec.shape)}{hint}")


def resolve_env_id(env: str, obs_shape: tuple[int, ...], env_kwargs: dict[str, Any] | None = None,
                   wrappers: Sequence[WrapperSpec] = (), frame_stack: int = 0) -> tuple[str, str | None]:
    """The gymnasium id to run a policy trained on ``env`` (an RL Zoo run's id), and a note if it changed.

    An id gymnasium cannot make any more (``HalfCheetah-v3`` needs mujoco-py; ``Pendulum-v0`` is gone)
    maps to the newest registered version of the same robot whose observations, after ``wrappers``
    and ``frame_stack``, have the policy's shape ``obs_shape`` (v3 → v5, else v4); otherwise the error
    lists what each version has.
    """
    import gymnasium as gym

    if ":" in env or (env in gym.envs.registry and not is_legacy_mujoco(env)):
        return env, None
    candidates = [v for v in newer_versions(env) if not is_legacy_mujoco(v)]
    seen: list[str] = []
    for cand in candidates:
        try:
            probe = env_factory(cand, env_kwargs, wrappers, frame_stack)()
        except Exception as exc:  # noqa: BLE001 - a version that cannot be made here is skipped, and said
            seen.append(f"{cand}: cannot be made ({str(exc).splitlines()[0][:80]})")
            continue
        try:
            shape = tuple(int(d) for d in probe.observation_space.shape)
        finally:
            probe.close()
        if shape == tuple(obs_shape):
            why = "needs mujoco-py, which gymnasium 1.x dropped" if is_legacy_mujoco(env) else \
                "is not registered in this gymnasium"
            return cand, (f"{env} {why}: running {cand}, the newest version with the same observation shape "
                          f"{shape}")
        seen.append(f"{cand} gives {shape}")
    if not candidates:
        raise EnvironmentSpecError(f"env {env!r} is not registered in this gymnasium and has no newer version; "
                                   "pass --env with the gymnasium id to run the policy in")
    raise EnvironmentSpecError(f"env {env!r}: no registered version has the policy's observation shape "
                               f"{tuple(obs_shape)} ({'; '.join(seen)}); pass --env ID (and --env-kwargs) for the "
                               "env the policy was trained on")
