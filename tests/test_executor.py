"""Validation rollouts spread over worker processes and Ray give the serial run's results, bit for bit."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from edgeq.envs import env_factory
from edgeq.errors import EdgeqError
from edgeq.rollout import EpisodeResults
from edgeq.validate.executor import ExecutorConfig, ProcessExecutor, SerialExecutor, shards
from edgeq.validate.paired import run_paired
from edgeq.validate.spread import perturbed_returns_spread, run_paired_spread
from edgeq.validate.stats import ActionErrorAccumulator
from edgeq.validate.targets import RuntimeSpec, make_runtime

BUNDLE = Path(__file__).parent / "fixtures" / "bundles" / "v1" / "sac-pendulum"
SEEDS = list(range(100, 118))  # 18 episodes: shards of 8, 8, 2


def _specs() -> tuple[RuntimeSpec, RuntimeSpec, dict]:
    io = json.loads((BUNDLE / "manifest.json").read_text()).get("io", {})
    return (RuntimeSpec.of("cpu", BUNDLE / "policy.fp32.onnx", io, "fp32"),
            RuntimeSpec.of("cpu", BUNDLE / "policy.int8.onnx", io, "int8"), io)


def _square(x: int) -> int:
    return x * x


def test_shards_depend_only_on_seeds_and_size() -> None:
    assert shards(range(5), 2) == [[0, 1], [2, 3], [4]]
    assert shards([], 8) == []
    with pytest.raises(EdgeqError):
        shards([1], 0)


def test_executor_config_rejects_bad_values() -> None:
    with pytest.raises(EdgeqError, match="--executor 'dask'"):
        ExecutorConfig(kind="dask")
    with pytest.raises(EdgeqError, match="--workers must be >= 1"):
        ExecutorConfig(workers=0)
    assert ExecutorConfig(workers=3).to_json()["kind"] == "processes"
    assert isinstance(ExecutorConfig().make(), SerialExecutor)


def test_env_factory_is_picklable_and_lambdas_are_refused() -> None:
    make = env_factory("Pendulum-v1", {"g": 9.81})
    clone = pickle.loads(pickle.dumps(make))
    assert clone == make
    env = clone()
    assert env.unwrapped.g == pytest.approx(9.81)
    env.close()
    with ProcessExecutor(1) as ex, pytest.raises(EdgeqError, match="--workers 1"):
        ex.map(lambda x: x, [1])


def test_process_executor_keeps_the_order() -> None:
    seen: list[int] = []
    with ProcessExecutor(2) as ex:
        out = ex.map(_square, list(range(7)), on_done=lambda i, r: seen.append(i))
    assert out == [i * i for i in range(7)]
    assert sorted(seen) == list(range(7))


def test_merged_parts_equal_one_accumulator_and_concat_joins_fields() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 3)), rng.normal(size=(30, 3))
    whole = ActionErrorAccumulator(3)
    whole.add(np.zeros_like(np.vstack([a, b])), np.vstack([a, b]))
    p1, p2 = ActionErrorAccumulator(3), ActionErrorAccumulator(3)
    p1.add(np.zeros_like(a), a)
    p2.add(np.zeros_like(b), b)
    merged = ActionErrorAccumulator.merge([p1, p2]).summary()
    ref = whole.summary()
    for key in ("steps", "max_abs", "p99_step_max_abs"):
        assert merged[key] == ref[key]
    assert merged["rms"] == pytest.approx(ref["rms"], rel=1e-12)
    r = EpisodeResults.concat([EpisodeResults([1], np.array([1.0]), np.array([3]), np.array([True]), 3),
                               EpisodeResults([2, 4], np.array([2.0, 5.0]), np.array([4, 5]), np.array([False, True]),
                                              9)])
    assert r.seeds == [1, 2, 4] and r.steps == 12
    assert r.returns.tolist() == [1.0, 2.0, 5.0] and r.terminated.tolist() == [True, False, True]


def _run(executor) -> tuple:  # type: ignore[no-untyped-def]
    f, q, _ = _specs()
    make_env = env_factory("Pendulum-v1")
    run = run_paired_spread(make_env, f, q, SEEDS, act_dim=1, num_envs=4, action_scale=np.array([2.0]),
                            executor=executor)
    floor = perturbed_returns_spread(make_env, f, SEEDS, sigma=1e-3, draws=2, low=np.array([-2.0]),
                                     high=np.array([2.0]), num_envs=4, draw_seed=7, executor=executor)
    return run, floor


def _same(a: tuple, b: tuple) -> None:  # type: ignore[type-arg]
    (ra, fa), (rb, fb) = a, b
    for side in ("reference", "candidate"):
        x, y = getattr(ra, side), getattr(rb, side)
        assert x.seeds == y.seeds
        assert np.array_equal(x.returns, y.returns) and np.array_equal(x.lengths, y.lengths)
        assert np.array_equal(x.terminated, y.terminated)
    ja, jb = ra.to_json(), rb.to_json()
    ja.pop("seconds"), jb.pop("seconds")
    assert ja == jb  # action error, divergence, paired difference: identical
    assert np.array_equal(fa, fb)


@pytest.fixture(scope="module")
def serial_run() -> tuple:  # type: ignore[type-arg]
    return _run(SerialExecutor())


def test_sharded_serial_run_matches_one_unsharded_rollout(serial_run: tuple) -> None:  # type: ignore[type-arg]
    f, q, io = _specs()
    run, floor = serial_run
    whole = run_paired(env_factory("Pendulum-v1"), make_runtime("cpu", f.path, io, precision="fp32"),
                       make_runtime("cpu", q.path, io), make_runtime("cpu", f.path, io, precision="fp32"),
                       make_runtime("cpu", q.path, io), SEEDS, num_envs=4, act_dim=1)
    assert np.array_equal(run.reference.returns, whole.reference.returns)
    assert np.array_equal(run.candidate.returns, whole.candidate.returns)
    assert floor.shape == (2, len(SEEDS)) and not np.array_equal(floor[0], floor[1])
    # the float policy keeps Pendulum upright: returns are real, not a degenerate zero run
    assert run.reference.returns.mean() > -400


def test_two_worker_processes_give_the_serial_results(serial_run: tuple) -> None:  # type: ignore[type-arg]
    with ProcessExecutor(2) as ex:
        _same(serial_run, _run(ex))


def test_local_ray_gives_the_serial_results(serial_run: tuple) -> None:  # type: ignore[type-arg]
    pytest.importorskip("ray", reason="the ray extra is part of the dev install; CI has it")
    with ExecutorConfig(kind="ray", workers=2).make() as ex:
        _same(serial_run, _run(ex))


def test_validate_command_with_two_workers_matches_serial(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgeq.cli import app

    outs = {}
    for name, extra in (("serial", []), ("workers", ["--workers", "2"])):
        out = tmp_path / name
        res = CliRunner().invoke(app, ["validate", str(BUNDLE), "--episodes", "10", "--targets", "cpu", "--quick",
                                       "--no-per-layer", "--latency-calls", "0", "--no-report", "--json",
                                       "--out", str(out), *extra])
        assert res.exit_code in (0, 1, 3), res.output
        outs[name] = json.loads((out / "validation.json").read_text())
    s, w = outs["serial"]["targets"]["cpu"], outs["workers"]["targets"]["cpu"]
    assert s["float"]["returns"] == w["float"]["returns"] and s["int8"]["returns"] == w["int8"]["returns"]
    assert s["noise_floor"] == w["noise_floor"]
    assert outs["workers"]["options"]["executor"] == {"kind": "processes", "workers": 2, "shard_size": 8}
