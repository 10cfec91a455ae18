"""Serve a deployed policy's ``act`` on a loopback TCP socket, for controllers not written in Python.

Listens on 127.0.0.1 only (other machines cannot connect). One binary protocol, little-endian,
several requests per connection::

    request   uint32 n, then n * obs_size float32        n observations (1 <= n <= max_batch)
              uint32 0                                  info: the policy's shapes and names
              uint32 0xFFFFFFFF                         reset the recurrent state
    response  uint32 status, uint32 nbytes, nbytes of payload
              status 0: n * act_size float32 actions (empty payload for a reset)
              status 1: a UTF-8 error message (e.g. a NaN observation); the connection stays open
              status 2: UTF-8 JSON (the answer to an info request)

A request larger than ``max_batch`` gets status 1 and the connection is closed (its payload is not
read). At most ``max_clients`` connections are served at once (1 for recurrent policies, whose state
is shared); an idle connection is closed after ``idle_timeout`` seconds. :class:`PolicyClient` is
the reference client. Only the standard library and numpy are used.
"""

from __future__ import annotations

import json
import socket
import socketserver
import struct
import threading
from typing import Any

import numpy as np

from edgeq.deploy.policy import DeployedPolicy
from edgeq.errors import EdgeqError

HOST = "127.0.0.1"
INFO, RESET = 0, 0xFFFFFFFF
OK, ERROR, JSON_REPLY = 0, 1, 2
_U32 = struct.Struct("<I")
_REPLY = struct.Struct("<II")


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None if the peer closed the connection before sending any."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if buf:
                raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
            return None
        buf += chunk
    return bytes(buf)


class _Handler(socketserver.BaseRequestHandler):
    server: PolicyServer

    def _reply(self, status: int, payload: bytes) -> None:
        self.request.sendall(_REPLY.pack(status, len(payload)) + payload)

    def handle(self) -> None:
        srv = self.server
        sock: socket.socket = self.request
        if not srv.slots.acquire(blocking=False):
            self._reply(ERROR, f"busy: {srv.max_clients} client(s) already connected".encode())
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(srv.idle_timeout)
            self._serve(sock)
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            srv.slots.release()

    def _serve(self, sock: socket.socket) -> None:
        srv, policy = self.server, self.server.policy
        obs_size = int(np.prod(policy.obs_shape))
        while True:
            head = _recv_exact(sock, 4)
            if head is None:
                return
            (n,) = _U32.unpack(head)
            if n == INFO:
                self._reply(JSON_REPLY, json.dumps(srv.info()).encode())
                continue
            if n == RESET:
                policy.reset()
                self._reply(OK, b"")
                continue
            if n > srv.max_batch:
                self._reply(ERROR, f"batch of {n} is larger than max_batch {srv.max_batch}".encode())
                return
            data = _recv_exact(sock, n * obs_size * 4)
            if data is None:
                return
            obs = np.frombuffer(data, dtype="<f4").reshape(n, *policy.obs_shape)
            try:
                actions = policy.act(obs)
            except EdgeqError as exc:
                self._reply(ERROR, str(exc).encode())
                continue
            self._reply(OK, np.ascontiguousarray(actions, dtype="<f4").tobytes())


class PolicyServer(socketserver.ThreadingTCPServer):
    """A threading TCP server on 127.0.0.1 that answers ``act`` requests for one policy."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, policy: DeployedPolicy, port: int = 0, *, max_clients: int = 4, max_batch: int | None = None,
                 idle_timeout: float | None = 600.0) -> None:
        self.policy = policy
        self.max_clients = 1 if policy.recurrent else max(1, int(max_clients))
        self.max_batch = int(max_batch or policy.max_batch or 4096)
        self.idle_timeout = idle_timeout
        self.slots = threading.BoundedSemaphore(self.max_clients)
        super().__init__((HOST, port), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def serve_until_interrupted(self, poll_interval: float = 0.2) -> None:
        """Print the ``{"serving": "127.0.0.1:PORT", ...}`` line (clients read the port from it), then
        serve until ``KeyboardInterrupt``, and close the socket."""
        print(json.dumps({"serving": f"{HOST}:{self.port}", **self.info()}), flush=True)
        try:
            self.serve_forever(poll_interval=poll_interval)
        except KeyboardInterrupt:
            pass
        finally:
            self.server_close()

    def info(self) -> dict[str, Any]:
        p = self.policy
        return {"obs_shape": list(p.obs_shape), "action_shape": list(p.action_shape), "dtype": "float32",
                "max_batch": self.max_batch, "precision": p.precision, "backend": p.backend,
                "recurrent": p.recurrent, "env": p.manifest.get("env", {}).get("id"),
                "format_version": p.manifest["format_version"]}


class ServerError(EdgeqError):
    """The policy server answered a request with an error."""


class PolicyClient:
    """Reference client: ``with PolicyClient(port) as c: actions = c.act(obs)``."""

    def __init__(self, port: int, *, timeout: float | None = 10.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._info: dict[str, Any] | None = None

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _request(self, payload: bytes) -> tuple[int, bytes]:
        self.sock.sendall(payload)
        head = _recv_exact(self.sock, _REPLY.size)
        if head is None:
            raise ServerError("the server closed the connection")
        status, nbytes = _REPLY.unpack(head)
        body = _recv_exact(self.sock, nbytes) if nbytes else b""
        return status, body or b""

    def info(self) -> dict[str, Any]:
        status, body = self._request(_U32.pack(INFO))
        if status != JSON_REPLY:
            raise ServerError(body.decode(errors="replace"))
        self._info = json.loads(body)
        return self._info

    def reset(self) -> None:
        status, body = self._request(_U32.pack(RESET))
        if status != OK:
            raise ServerError(body.decode(errors="replace"))

    def act(self, obs: Any) -> np.ndarray:
        """Actions for one observation (obs_shape) or a batch; the server checks shapes and values."""
        info = self._info or self.info()
        obs_shape, act_shape = tuple(info["obs_shape"]), tuple(info["action_shape"])
        arr = np.asarray(obs, dtype="<f4")
        single = arr.shape == obs_shape
        batch = arr.reshape(1, *obs_shape) if single else arr
        if batch.shape[1:] != obs_shape or batch.shape[0] == 0:
            raise ServerError(f"observation shape {arr.shape}; expected {obs_shape} or (batch, *{obs_shape})")
        status, body = self._request(_U32.pack(batch.shape[0]) + np.ascontiguousarray(batch).tobytes())
        if status != OK:
            raise ServerError(body.decode(errors="replace"))
        actions = np.frombuffer(body, dtype="<f4").reshape(batch.shape[0], *act_shape).astype(np.float32)
        return actions[0] if single else actions
