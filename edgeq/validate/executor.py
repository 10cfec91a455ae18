"""Where validation rollouts run: in this process, in worker processes, or on a Ray cluster.

Validation episodes are independent given their seeds, so the rollout code cuts a list of seeds
into *shards* of consecutive seeds (:func:`shards`; the cut depends only on the seeds and the
shard size, never on how many workers there are), runs one task per shard through an
:class:`Executor`, and merges the per-shard results in shard order. Every executor therefore gives
bit-identical results for the same seeds: the serial executor runs the same shard tasks in this
process, one after the other.

* ``serial``: this process (the default; no start-up cost).
* ``processes``: ``workers`` spawned worker processes on this machine
  (:class:`concurrent.futures.ProcessPoolExecutor` with the ``spawn`` start method, so no ONNX
  Runtime or MuJoCo state is forked).
* ``ray``: tasks on a Ray cluster (``pip install 'edgeq[ray]'``): ``address=None`` starts a local
  Ray instance with ``workers`` CPUs, ``address="auto"`` or ``"ray://host:10001"`` joins a running
  cluster. Every node needs edgeq, the environment and the bundle's files at the same path.

Tasks and their arguments must be picklable: top-level functions and frozen dataclasses
(:class:`edgeq.envs.EnvFactory`, :class:`edgeq.validate.paired.RuntimeSpec`), not lambdas.
"""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from edgeq.errors import EdgeqError

T = TypeVar("T")
R = TypeVar("R")

EXECUTORS = ("serial", "processes", "ray")
#: seeds per shard: one batch of the vector env, small enough to keep two workers busy on 16 episodes
DEFAULT_SHARD_SIZE = 8


def shards(seeds: Sequence[int], size: int = DEFAULT_SHARD_SIZE) -> list[list[int]]:
    """``seeds`` cut into consecutive runs of ``size`` (the last may be shorter)."""
    if size < 1:
        raise EdgeqError(f"shard size must be >= 1, got {size}")
    s = [int(x) for x in seeds]
    return [s[i:i + size] for i in range(0, len(s), size)]


class Executor(Protocol):
    """Runs ``fn`` on every item and returns the results in the items' order."""

    name: str
    workers: int

    def map(self, fn: Callable[[T], R], items: Sequence[T],
            on_done: Callable[[int, R], None] | None = None) -> list[R]: ...

    def close(self) -> None: ...


class SerialExecutor:
    """Runs the tasks in this process, in order."""

    name = "serial"
    workers = 1

    def map(self, fn: Callable[[T], R], items: Sequence[T],
            on_done: Callable[[int, R], None] | None = None) -> list[R]:
        out: list[R] = []
        for i, item in enumerate(items):
            out.append(fn(item))
            if on_done is not None:
                on_done(i, out[-1])
        return out

    def close(self) -> None:
        return None

    def __enter__(self) -> SerialExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_picklable(fn: Callable[..., Any], items: Sequence[Any], where: str) -> None:
    try:
        pickle.dumps((fn, items[0] if items else None))
    except Exception as exc:  # lambdas, open sessions, local classes
        raise EdgeqError(f"{where} needs picklable rollout tasks (an env made by a gymnasium id or a "
                         f"module:callable, models given as files); this one is not ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); run with --workers 1") from None


class ProcessExecutor:
    """Worker processes on this machine (spawned once, reused for every :meth:`map`)."""

    name = "processes"

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise EdgeqError(f"--workers must be >= 1, got {workers}")
        self.workers = int(workers)
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers,
                                             mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def map(self, fn: Callable[[T], R], items: Sequence[T],
            on_done: Callable[[int, R], None] | None = None) -> list[R]:
        if not items:
            return []
        _check_picklable(fn, items, "--workers")
        pool = self._get_pool()
        futures: dict[Future[R], int] = {pool.submit(fn, item): i for i, item in enumerate(items)}
        results: dict[int, R] = {}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = futures[fut]
                    results[i] = fut.result()
                    if on_done is not None:
                        on_done(i, results[i])
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
        return [results[i] for i in range(len(items))]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ProcessExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RayExecutor:
    """Tasks on a Ray cluster; ``address=None`` starts (and later stops) a local instance."""

    name = "ray"

    def __init__(self, workers: int = 1, address: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise EdgeqError("--executor ray needs Ray: pip install 'edgeq[ray]'") from None
        if workers < 1:
            raise EdgeqError(f"--workers must be >= 1, got {workers}")
        self._ray = ray
        self.workers = int(workers)
        self.address = address
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "ignore_reinit_error": True}
            if address is None:
                kwargs["num_cpus"] = self.workers
            else:
                kwargs["address"] = address
            ray.init(**kwargs)
            self._started = True
        self._remote: dict[Callable[..., Any], Any] = {}

    def map(self, fn: Callable[[T], R], items: Sequence[T],
            on_done: Callable[[int, R], None] | None = None) -> list[R]:
        if not items:
            return []
        _check_picklable(fn, items, "--executor ray")
        ray = self._ray
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = ray.remote(num_cpus=1, max_retries=0)(fn)
        refs = [remote.remote(item) for item in items]
        index = {ref: i for i, ref in enumerate(refs)}
        results: dict[int, R] = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = index[ref]
                results[i] = ray.get(ref)
                if on_done is not None:
                    on_done(i, results[i])
        return [results[i] for i in range(len(items))]

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ExecutorConfig:
    """How validation rollouts are spread: ``kind`` (serial, processes, ray), ``workers``, Ray ``address``.

    ``workers > 1`` with ``kind="serial"`` means worker processes (the CLI's ``--workers N``).
    """

    kind: str = "serial"
    workers: int = 1
    address: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise EdgeqError(f"--executor {self.kind!r} is not known; choose one of {', '.join(EXECUTORS)}")
        if self.workers < 1:
            raise EdgeqError(f"--workers must be >= 1, got {self.workers}")
        if self.shard_size < 1:
            raise EdgeqError(f"shard size must be >= 1, got {self.shard_size}")

    def make(self) -> SerialExecutor | ProcessExecutor | RayExecutor:
        """A fresh executor (close it, or use it as a context manager)."""
        if self.kind == "ray":
            return RayExecutor(self.workers, self.address)
        if self.kind == "processes" or self.workers > 1:
            return ProcessExecutor(self.workers)
        return SerialExecutor()

    def to_json(self) -> dict[str, Any]:
        kind = "processes" if self.kind == "serial" and self.workers > 1 else self.kind
        return {"kind": kind, "workers": self.workers, "shard_size": self.shard_size,
                **({"address": self.address} if self.address else {})}
