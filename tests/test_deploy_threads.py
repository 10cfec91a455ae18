"""One DeployedPolicy shared by many threads gives exactly the single-threaded actions."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from conftest import FIXTURES

import edgeq.deploy

V1 = FIXTURES / "bundles" / "v1" / "sac-pendulum"


def test_many_threads_equal_single_thread() -> None:
    policy = edgeq.deploy.load(V1, backend="cpu", allow_unsigned=True)
    rng = np.random.default_rng(0)
    n_threads, calls = 16, 60
    # per thread a mix of single observations and batches of different sizes
    work = [[rng.uniform([-1, -1, -8], [1, 1, 8], size=(3,) if k % 3 else (1 + k % 7, 3)).astype(np.float32)
             for k in range(calls)] for _ in range(n_threads)]
    expected = [[policy.act(obs) for obs in items] for items in work]
    policy.reset_latency()

    def worker(i: int) -> list[np.ndarray]:
        return [policy.act(obs) for obs in work[i]]

    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        results = list(pool.map(worker, range(n_threads)))
    for got_items, want_items in zip(results, expected, strict=True):
        for got, want in zip(got_items, want_items, strict=True):
            assert got.shape == want.shape
            np.testing.assert_array_equal(got, want)
    assert policy.latency["calls"] == policy.backend_latency["calls"] == n_threads * calls
