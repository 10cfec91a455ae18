"""``edgeq serve`` / ``edgeq-deploy serve``: act over 127.0.0.1, checked against in-process act."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES

import edgeq.deploy
from edgeq.deploy.serve import HOST, PolicyClient, PolicyServer, ServerError

V1 = FIXTURES / "bundles" / "v1" / "sac-pendulum"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def policy() -> edgeq.deploy.DeployedPolicy:
    return edgeq.deploy.load(V1, backend="cpu", allow_unsigned=True)


@pytest.fixture
def server(policy: edgeq.deploy.DeployedPolicy) -> Iterator[PolicyServer]:
    srv = PolicyServer(policy, 0, max_clients=3, idle_timeout=5.0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _wait_until_idle(server: PolicyServer, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.active_connections() == 0:
            return
        time.sleep(0.01)
    raise AssertionError("server connections did not close")


def test_binds_loopback_only(server: PolicyServer) -> None:
    assert server.server_address[0] == HOST == "127.0.0.1"


def test_act_single_and_batch_equal_in_process(server: PolicyServer, policy: edgeq.deploy.DeployedPolicy) -> None:
    obs = np.random.default_rng(1).uniform([-1, -1, -8], [1, 1, 8], (32, 3)).astype(np.float32)
    with PolicyClient(server.port) as c:
        info = c.info()
        assert info["obs_shape"] == [3] and info["action_shape"] == [1] and info["format_version"] == 1
        np.testing.assert_array_equal(c.act(obs), policy.act(obs))
        for row in obs[:5]:
            got = c.act(row)
            assert got.shape == (1,)
            np.testing.assert_array_equal(got, policy.act(row))
        c.reset()


def test_bad_input_is_an_error_reply_and_the_connection_survives(server: PolicyServer) -> None:
    with PolicyClient(server.port) as c:
        with pytest.raises(ServerError, match="non-finite value"):
            c.act([0.0, np.nan, 0.0])
        assert c.act([0.0, 1.0, 0.0]).shape == (1,)


def test_raw_protocol_oversized_batch_closes(server: PolicyServer) -> None:
    with socket.create_connection((HOST, server.port), timeout=5) as s:
        token = server.token.encode()
        s.sendall(struct.pack("<II", 0xFFFFFFFE, len(token)) + token)
        assert struct.unpack("<II", s.recv(8)) == (0, 0)  # authenticated
        s.sendall(struct.pack("<I", server.max_batch + 1))
        status, n = struct.unpack("<II", s.recv(8))
        assert status == 1 and b"larger than max_batch" in s.recv(n)
        assert s.recv(1) == b""  # closed: the payload was never read


def test_concurrent_clients_and_the_client_limit(server: PolicyServer, policy: edgeq.deploy.DeployedPolicy) -> None:
    rng = np.random.default_rng(2)
    batches = [rng.uniform(-1, 1, (4, 3)).astype(np.float32) for _ in range(3)]

    def run(b: np.ndarray) -> np.ndarray:
        with PolicyClient(server.port) as c:
            return np.stack([c.act(b) for _ in range(20)])

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, batches))
    for b, r in zip(batches, results, strict=True):
        np.testing.assert_array_equal(r, np.broadcast_to(policy.act(b), r.shape))
    _wait_until_idle(server)  # the handlers of the closed connections release their slots
    clients = [PolicyClient(server.port) for _ in range(3)]
    try:
        for c in clients:
            c.info()  # all three slots taken, and used less than evict_idle ago
        with pytest.raises(ServerError, match="busy: 3 client"):
            PolicyClient(server.port)
        time.sleep(server.evict_idle + 0.2)  # now idle: a new client takes the slot idle the longest
        with PolicyClient(server.port) as fourth:
            assert fourth.act([0.1, 0.2, 0.3]).shape == (1,)
        closed = 0
        for c in clients:  # exactly one of the three idle clients was evicted (closed); the others still act
            try:
                assert c.act([0.1, 0.2, 0.3]).shape == (1,)
            except (ServerError, OSError):
                closed += 1
        assert closed == 1
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("command, stop", [
    # the containers' entrypoint
    (["-m", "edgeq.deploy", "serve", str(V1), "--port", "0", "--allow-unsigned"], signal.SIGTERM),
    (["-m", "edgeq.cli", "serve", str(V1), "--port", "0", "--allow-unsigned"], signal.SIGINT),  # the workstation CLI
])
def test_serve_commands(command: list[str], stop: signal.Signals, policy: edgeq.deploy.DeployedPolicy) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # started as a background job of a non-interactive shell or by a supervisor is: SIGINT inherited ignored
    # (Python then raises no KeyboardInterrupt by itself); the server binds SIGINT/SIGTERM explicitly
    proc = subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        host, port = first["serving"].split(":")
        assert (os.stat(first["token_file"]).st_mode & 0o777) == 0o600  # only this user can act
        assert host == "127.0.0.1" and first["backend"] in ("cpu", "cuda-fused", "cuda-ort")
        with PolicyClient(int(port)) as c:
            np.testing.assert_array_equal(c.act([0.3, -0.2, 1.5]), policy.act([0.3, -0.2, 1.5]))
        proc.send_signal(stop)
        assert proc.wait(timeout=120) == 0  # generous: a loaded 2-core CI machine, not a timing test
    finally:
        proc.kill()
        proc.wait()
