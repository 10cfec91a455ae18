"""A health self-test of the deploy runtime and (optionally) one bundle, for containers and robots.

:func:`run_selftest` returns a report; it never raises for a failed check (a failed check is a
line in the report with ``ok: false``), so ``edgeq-deploy selftest`` can print all of them and
exit non-zero. Checks, in order:

* ``runtime``: numpy and onnxruntime import; which backends are available here (the report also
  lists any workstation module, such as torch or onnx, that the process has imported).
* ``bundle``: the manifest's format version is readable and every file matches its SHA-256.
* ``load``: the policy loads on the requested backend.
* ``actions``: on observations sampled inside the observation space's bounds the actions have the
  action space's shape, are finite and (if the graph rescales or clips to the action space) lie
  within its bounds; a batch gives the same actions as one call per row; a repeated call gives the
  same actions.
* ``input_checks``: a wrongly shaped and a non-finite observation are refused.
* ``reference`` (if given a reference file): the actions on stored observations match stored actions.
* ``latency``: single-observation calls; statistics only, or a failure above ``max_p99_us``.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import EdgeqError

#: Modules of the workstation side that must never be imported by the deploy runtime.
WORKSTATION_MODULES = ("torch", "gymnasium", "gym", "stable_baselines3", "sb3_contrib", "onnx", "typer",
                       "rich", "matplotlib", "yaml")


def _bound(values: list[Any], shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray([float(v) for v in values], dtype=np.float64).reshape(shape)


def sample_observations(manifest: dict[str, Any], n: int, seed: int = 0) -> np.ndarray:
    """``n`` observations inside the observation space: uniform where both bounds are finite, else
    standard normal clipped to the bounds (deterministic for ``seed``)."""
    space = manifest["observation_space"]
    shape = tuple(space["shape"])
    low, high = _bound(space["low"], shape), _bound(space["high"], shape)
    rng = np.random.default_rng(seed)
    finite = np.isfinite(low) & np.isfinite(high)
    uniform = rng.uniform(np.where(finite, low, 0.0), np.where(finite, high, 1.0), size=(n, *shape))
    normal = np.clip(rng.standard_normal((n, *shape)), low, high)
    return np.where(finite, uniform, normal).astype(np.float32)


def action_scale(manifest: dict[str, Any]) -> float:
    """The largest finite action bound's magnitude, at least 1: tolerances are fractions of it."""
    space = manifest["action_space"]
    bounds = np.abs([float(v) for v in (*space["low"], *space["high"])])
    finite = bounds[np.isfinite(bounds)]
    return float(max(1.0, finite.max())) if finite.size else 1.0


def batch_tolerance(precision: str, backend: str, scale: float) -> float:
    """How far one-by-one actions may be from batched ones. On the CPU, edgeq's ONNX Runtime
    sessions give identical results (1e-5 for safety). GPU kernels accumulate in another order for
    another batch size (1e-4 in fp32), and in an int8 graph such a tiny float difference can move an
    activation across a rounding boundary, one quantization step, which moves the action by up to a
    few percent: allow 5% of the action scale there."""
    if backend == "cpu":
        return 1e-5 * scale
    return (0.05 if precision == "int8" else 1e-4) * scale


def write_reference(policy: Any, path: Path, *, n: int = 8, seed: int = 0) -> dict[str, Any]:
    """Store ``n`` sampled observations and ``policy``'s actions for them (for ``--reference``)."""
    obs = sample_observations(policy.manifest, n, seed)
    policy.reset()
    actions = policy.act(obs)
    ref = {"precision": policy.precision, "backend": policy.backend, "providers": policy.providers,
           "observations": obs.tolist(), "actions": actions.tolist()}
    path.write_text(json.dumps(ref, indent=1) + "\n")
    return ref


class _Report:
    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}

    def check(self, name: str, fn: Callable[[], str]) -> bool:
        try:
            detail = fn()
            ok = True
        except (EdgeqError, AssertionError, ImportError, OSError, ValueError, RuntimeError) as exc:
            detail, ok = f"{type(exc).__name__}: {exc}", False
        self.checks.append({"name": name, "ok": ok, "detail": detail})
        return ok

    def to_json(self) -> dict[str, Any]:
        return {"ok": all(c["ok"] for c in self.checks), "checks": self.checks, **self.info}


def run_selftest(bundle: str | Path | None = None, *, backend: str = "auto", precision: str = "int8",
                 samples: int = 64, seed: int = 0, latency_calls: int = 200, max_p99_us: float | None = None,
                 reference: str | Path | None = None, reference_atol: float | None = None,
                 trusted_keys: Any = None, allow_unsigned: bool = False) -> dict[str, Any]:
    """Run the checks listed in the module docstring; returns ``{"ok", "checks", "runtime", ...}``.

    ``trusted_keys`` / ``allow_unsigned``: the signature policy of :func:`edgeq.deploy.load` (the
    ``bundle`` check fails on an unsigned bundle unless ``allow_unsigned``).

    ``reference_atol`` defaults to 1% of the action scale (:func:`action_scale`): stored int8 actions
    from another machine or backend may differ by a quantization step here and there.
    """
    from edgeq.deploy.bundle_format import read_manifest
    from edgeq.deploy.policy import load
    from edgeq.deploy.trt_backend import tensorrt_available
    from edgeq.errors import InputError

    rep = _Report()
    state: dict[str, Any] = {}

    def runtime() -> str:
        import onnxruntime as ort

        rep.info["runtime"] = {"python": platform.python_version(), "machine": platform.machine(),
                               "numpy": np.__version__, "onnxruntime": ort.__version__,
                               "ort_providers": ort.get_available_providers(),
                               "tensorrt": tensorrt_available(),
                               "workstation_modules_loaded": [m for m in WORKSTATION_MODULES if m in sys.modules]}
        return (f"numpy {np.__version__}, onnxruntime {ort.__version__} ({platform.machine()}); providers: "
                f"{', '.join(ort.get_available_providers())}; TensorRT: "
                f"{'yes' if rep.info['runtime']['tensorrt'] else 'no'}")

    rep.check("runtime", runtime)
    if bundle is None:
        return rep.to_json()
    root = Path(bundle)

    def verify() -> str:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = read_manifest(root, verify=True, trusted_keys=trusted_keys, allow_unsigned=allow_unsigned)
        state["manifest"] = m
        signed = "signature verified" if trusted_keys else "UNSIGNED (allowed)" if caught else "signature not checked"
        rep.info["bundle"] = {"path": str(root), "format_version": m["format_version"],
                              "edgeq_version": m.get("edgeq_version"), "env": (m.get("env") or {}).get("id"),
                              "algorithm": m.get("source", {}).get("algorithm"), "files": sorted(m["files"])}
        rep.info["bundle"]["signature"] = signed
        return f"format_version {m['format_version']}, {len(m['files'])} files match their SHA-256; {signed}"

    if not rep.check("bundle", verify):
        return rep.to_json()

    def do_load() -> str:
        p = load(root, backend=backend, precision=precision, verify=False, allow_unsigned=True)  # checked above
        state["policy"] = p
        rep.info["policy"] = {"backend": p.backend, "precision": p.precision, "providers": p.providers,
                              "obs_shape": list(p.obs_shape), "action_shape": list(p.action_shape),
                              "recurrent": p.recurrent}
        return f"{p.precision} on {p.backend} ({', '.join(p.providers)})"

    if not rep.check("load", do_load):
        return rep.to_json()
    policy = state["policy"]
    manifest = state["manifest"]

    def actions() -> str:
        obs = sample_observations(manifest, samples, seed)
        policy.reset()
        batch = policy.act(obs)
        assert batch.shape == (samples, *policy.action_shape), f"batch actions have shape {batch.shape}"
        assert np.all(np.isfinite(batch)), "non-finite actions"
        singles = []
        for row in obs:
            policy.reset()
            singles.append(policy.act(row))
        single = np.stack(singles)
        diff = float(np.max(np.abs(single - batch)))
        tol = batch_tolerance(policy.precision, policy.backend, action_scale(manifest))
        assert diff <= tol, f"one-by-one actions differ from batch actions by up to {diff:g} (> {tol:g})"
        policy.reset()
        again = policy.act(obs)
        assert np.array_equal(again, batch), "a repeated call gave different actions"
        space, post = manifest["action_space"], manifest.get("postprocess", {})
        bounded = "action_space" in (post.get("rescale"), post.get("clip"))
        if bounded:
            low = _bound(space["low"], policy.action_shape)
            high = _bound(space["high"], policy.action_shape)
            tol = 1e-4 * np.maximum(1.0, np.abs(high - low))
            assert np.all(batch >= low - tol) and np.all(batch <= high + tol), "actions outside the action space"
        return (f"{samples} sampled observations: shape {batch.shape[1:]}, finite"
                f"{', within bounds' if bounded else ''}; batch == one-by-one (max diff {diff:.1e}); repeatable")

    rep.check("actions", actions)

    def input_checks() -> str:
        for bad, what in ((np.zeros((*policy.obs_shape[:-1], policy.obs_shape[-1] + 1), np.float32), "shape"),
                          (np.full(policy.obs_shape, np.nan, np.float32), "NaN")):
            try:
                policy.check_obs(bad)
            except InputError:
                continue
            if what == "NaN" and policy.nan_policy != "error":
                continue
            raise AssertionError(f"an observation with a wrong {what} was accepted")
        return "wrong shape and NaN observations are refused"

    rep.check("input_checks", input_checks)

    if reference is not None:
        def ref_check() -> str:
            ref = json.loads(Path(reference).read_text())
            obs = np.asarray(ref["observations"], np.float32)
            want = np.asarray(ref["actions"], np.float32)
            policy.reset()
            got = policy.act(obs)
            diff = float(np.max(np.abs(got - want)))
            atol = reference_atol if reference_atol is not None else 0.01 * action_scale(manifest)
            rep.info["reference"] = {"max_abs_diff": diff, "atol": atol, "observations": len(obs)}
            assert diff <= atol, f"actions differ from the reference by up to {diff:g} (> {atol:g})"
            return f"{len(obs)} stored observations: actions within {diff:.2e} of the reference"

        rep.check("reference", ref_check)

    def latency() -> str:
        obs = sample_observations(manifest, latency_calls, seed + 1)
        policy.reset()
        policy.reset_latency()
        for row in obs:
            policy.act(row)
        lat = policy.latency
        rep.info["latency_us"] = {"act": lat, "backend": policy.backend_latency}
        policy.reset()
        if max_p99_us is not None:
            assert lat["p99_us"] <= max_p99_us, f"p99 latency {lat['p99_us']:.0f} us > {max_p99_us:.0f} us"
        return f"{latency_calls} single calls: median {lat['median_us']:.0f} us, p99 {lat['p99_us']:.0f} us"

    if latency_calls > 0:
        rep.check("latency", latency)
    return rep.to_json()
