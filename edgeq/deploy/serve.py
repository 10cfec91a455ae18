"""Serve a deployed policy's ``act`` on a loopback TCP socket, for controllers not written in Python.

Listens on 127.0.0.1 only (other machines cannot connect). One binary protocol, little-endian,
several requests per connection::

    request   uint32 0xFFFFFFFE, uint32 len, len bytes   authenticate with the server's token (first)
              uint32 n, then n * obs_size float32        n observations (1 <= n <= max_batch)
              uint32 0                                  info: the policy's shapes and names
              uint32 0xFFFFFFFF                         reset this client's recurrent state
    response  uint32 status, uint32 nbytes, nbytes of payload
              status 0: n * act_size float32 actions (empty payload for a reset or an accepted token)
              status 1: a UTF-8 error message (e.g. a NaN observation); the connection stays open
              status 2: UTF-8 JSON (the answer to an info request)

Staying available when some clients misbehave:

* **Authentication.** ``act`` and ``reset`` need the server's token (random, 32 bytes, written to a
  file only its user can read, ``token_file``; or given). A connection that sends no valid token
  within ``request_timeout`` is closed; a wrong token closes it at once.
* **Deadlines.** Once the first byte of a request arrives, the whole request must arrive within
  ``request_timeout`` seconds (a client sending a byte every few seconds is cut off); between
  requests a connection may idle ``idle_timeout`` seconds.
* **Slots.** At most ``max_clients`` connections are served at once. When all are taken, a new
  connection takes the slot of an unauthenticated one, else of the authenticated one idle the longest
  (at least ``evict_idle`` seconds); only if every slot is busy mid-request does it get ``busy``.
* **Per-client state.** A recurrent (or observation-history) policy's state is kept per connection:
  one client's calls and resets never touch another's.

A request larger than ``max_batch`` gets status 1 and the connection is closed (its payload is not
read). :class:`PolicyClient` is the reference client. Only the standard library and numpy are used.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import signal
import socket
import socketserver
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.deploy.policy import DeployedPolicy
from edgeq.errors import EdgeqError

HOST = "127.0.0.1"
INFO, RESET, AUTH = 0, 0xFFFFFFFF, 0xFFFFFFFE
OK, ERROR, JSON_REPLY = 0, 1, 2
_U32 = struct.Struct("<I")
_REPLY = struct.Struct("<II")
MAX_TOKEN_BYTES = 256


def default_token_file(port: int) -> Path:
    """Where a server on ``port`` writes its token unless told otherwise (``$EDGEQ_SERVE_TOKEN_FILE``)."""
    env = os.environ.get("EDGEQ_SERVE_TOKEN_FILE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"edgeq-serve-{os.getuid() if hasattr(os, 'getuid') else 0}-{port}.token"


def write_token_file(path: Path, token: str) -> None:
    """Write ``token`` to ``path`` readable by this user only (0600), replacing any previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes | None:
    """``n`` bytes, or None if the peer closed the connection before sending any. With ``deadline``
    (``time.monotonic()``), raise ``TimeoutError`` when the bytes have not all arrived by then."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"request not complete after {len(buf)} of {n} bytes")
            sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if buf:
                raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
            return None
        buf += chunk
    return bytes(buf)


class _Conn:
    """One client connection's bookkeeping (guarded by the server's ``conn_lock``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.authenticated = False
        self.busy = False  # mid-request
        self.last = time.monotonic()
        self.evicted = False
        self.state: list[tuple[Any, str, Any]] | None = None  # this client's recurrent state, None: fresh


def _state_holders(policy: DeployedPolicy) -> list[Any]:
    """The runtime objects along ``policy.runtime`` (wrappers first) that carry per-episode state."""
    out: list[Any] = []
    rt: Any = policy.runtime
    while rt is not None and len(out) < 8:
        out.append(rt)
        rt = rt.__dict__.get("runtime")
    return out


def _snapshot(policy: DeployedPolicy) -> list[tuple[Any, str, Any]]:
    saved: list[tuple[Any, str, Any]] = []
    for h in _state_holders(policy):
        if isinstance(h.__dict__.get("_state"), dict):
            saved.append((h, "_state", {k: np.array(v, copy=True) for k, v in h._state.items()}))
        history = h.__dict__.get("history")
        if history is not None and hasattr(history, "_buf"):
            saved.append((history, "_buf", np.array(history._buf, copy=True)))
            if hasattr(history, "_fresh"):  # which rows start an episode on their next observation
                saved.append((history, "_fresh", np.array(history._fresh, copy=True)))
    return saved


def _restore(saved: list[tuple[Any, str, Any]]) -> None:
    for holder, attr, value in saved:
        setattr(holder, attr, {k: np.array(v, copy=True) for k, v in value.items()} if isinstance(value, dict)
                else np.array(value, copy=True))


class _Handler(socketserver.BaseRequestHandler):
    server: PolicyServer

    def _reply(self, status: int, payload: bytes) -> None:
        self.request.settimeout(self.server.request_timeout)  # a client that does not read cannot hold us
        self.request.sendall(_REPLY.pack(status, len(payload)) + payload)

    def handle(self) -> None:
        srv = self.server
        sock: socket.socket = self.request
        conn = srv._admit(sock)
        if conn is None:
            try:
                self._reply(ERROR, f"busy: {srv.max_clients} client(s) already connected and active".encode())
            except OSError:
                pass
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._serve(sock, conn)
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            srv._release(conn)

    def _serve(self, sock: socket.socket, conn: _Conn) -> None:
        srv, policy = self.server, self.server.policy
        obs_size = int(np.prod(policy.obs_shape))
        while True:
            # between requests: idle_timeout (request_timeout until the client has authenticated)
            wait = srv.idle_timeout if conn.authenticated else srv.request_timeout
            sock.settimeout(wait)
            first = sock.recv(1)
            if not first:
                return
            deadline = time.monotonic() + srv.request_timeout
            with srv.conn_lock:
                conn.busy = True
            rest = _recv_exact(sock, 3, deadline)
            if rest is None:
                return
            (n,) = _U32.unpack(first + rest)
            if n == AUTH:
                head = _recv_exact(sock, 4, deadline)
                size = _U32.unpack(head)[0] if head else MAX_TOKEN_BYTES + 1
                token = _recv_exact(sock, size, deadline) if size <= MAX_TOKEN_BYTES else None
                if token is None or not hmac.compare_digest(token, srv.token.encode()):
                    self._reply(ERROR, b"authentication failed: wrong token (read it from the server's token file)")
                    return
                with srv.conn_lock:
                    conn.authenticated = True
                self._reply(OK, b"")
            elif n == INFO:
                self._reply(JSON_REPLY, json.dumps(srv.info()).encode())
            elif not conn.authenticated:
                self._reply(ERROR, b"not authenticated: send the server's token first (PolicyClient(token=...))")
                return
            elif n == RESET:
                conn.state = None
                self._reply(OK, b"")
            elif n > srv.max_batch:
                self._reply(ERROR, f"batch of {n} is larger than max_batch {srv.max_batch}".encode())
                return
            else:
                data = _recv_exact(sock, n * obs_size * 4, deadline)
                if data is None:
                    return
                obs = np.frombuffer(data, dtype="<f4").reshape(n, *policy.obs_shape)
                try:
                    actions = srv._act(conn, obs)
                except EdgeqError as exc:
                    self._reply(ERROR, str(exc).encode())
                else:
                    self._reply(OK, np.ascontiguousarray(actions, dtype="<f4").tobytes())
            with srv.conn_lock:
                conn.busy = False
                conn.last = time.monotonic()
            if conn.evicted:
                return


class PolicyServer(socketserver.ThreadingTCPServer):
    """A threading TCP server on 127.0.0.1 that answers ``act`` requests for one policy (see the module
    docstring for authentication, deadlines, slots and per-client state)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, policy: DeployedPolicy, port: int = 0, *, max_clients: int = 8, max_batch: int | None = None,
                 idle_timeout: float = 60.0, request_timeout: float = 2.0, evict_idle: float = 1.0,
                 token: str | None = None, token_file: str | Path | None = None) -> None:
        self.policy = policy
        self.max_clients = max(1, int(max_clients))
        self.max_batch = int(max_batch or policy.max_batch or 4096)
        self.idle_timeout = float(idle_timeout)
        self.request_timeout = float(request_timeout)
        self.evict_idle = float(evict_idle)
        self.token = token or secrets.token_urlsafe(32)
        self.conn_lock = threading.Lock()
        self.conns: list[_Conn] = []
        self._state_lock = threading.Lock()
        self._stateful = policy.recurrent or bool(_snapshot(policy))
        super().__init__((HOST, port), _Handler)
        self.token_file: Path | None = None
        if token is None or token_file is not None:
            self.token_file = Path(token_file) if token_file is not None else default_token_file(self.port)
            write_token_file(self.token_file, self.token)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def active_connections(self) -> int:
        with self.conn_lock:
            return len(self.conns)

    def _admit(self, sock: socket.socket) -> _Conn | None:
        """Register a new connection, evicting an unauthenticated or long-idle one if every slot is taken."""
        conn = _Conn(sock)
        with self.conn_lock:
            if len(self.conns) >= self.max_clients:
                now = time.monotonic()
                idle = [c for c in self.conns if not c.busy and not c.evicted
                        and (not c.authenticated or now - c.last >= self.evict_idle)]
                if not idle:
                    return None
                victim = min(idle, key=lambda c: (c.authenticated, c.last))
                victim.evicted = True
                self.conns.remove(victim)
                msg = b"busy: this idle connection's slot was given to a new client; reconnect"
                try:  # not mid-request, so its handler is not writing: tell it why, then wake its handler
                    victim.sock.send(_REPLY.pack(ERROR, len(msg)) + msg, socket.MSG_DONTWAIT)
                except OSError:
                    pass
                try:
                    victim.sock.shutdown(socket.SHUT_RDWR)  # wakes its handler, which then ends
                except OSError:
                    pass
            self.conns.append(conn)
        return conn

    def _release(self, conn: _Conn) -> None:
        with self.conn_lock:
            if conn in self.conns:
                self.conns.remove(conn)

    def _act(self, conn: _Conn, obs: np.ndarray) -> np.ndarray:
        if not self._stateful:
            return self.policy.act(obs)
        with self._state_lock:  # swap this client's state in, act, keep what it became
            if conn.state is None:
                self.policy.reset()
            else:
                _restore(conn.state)
            try:
                return self.policy.act(obs)
            finally:
                conn.state = _snapshot(self.policy)

    def serve_until_interrupted(self, poll_interval: float = 0.2) -> None:
        """Print the ``{"serving": "127.0.0.1:PORT", "token_file": ..., ...}`` line (clients read the port
        and the token file from it), then serve until ``KeyboardInterrupt``, SIGINT or SIGTERM, and close the socket.

        In the main thread SIGINT and SIGTERM are bound explicitly (and restored on return): a server started
        in the background by a non-interactive shell, or by a supervisor, inherits SIGINT *ignored*, and
        Python then never raises ``KeyboardInterrupt``, so Ctrl-C or ``kill -INT`` would not stop it."""
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            def stop(*_: Any) -> None:
                raise KeyboardInterrupt

            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, stop)
        print(json.dumps({"serving": f"{HOST}:{self.port}",
                          "token_file": str(self.token_file) if self.token_file else None, **self.info()}),
              flush=True)
        try:
            self.serve_forever(poll_interval=poll_interval)
        except KeyboardInterrupt:
            pass
        finally:
            self.server_close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def info(self) -> dict[str, Any]:
        p = self.policy
        return {"obs_shape": list(p.obs_shape), "action_shape": list(p.action_shape), "dtype": "float32",
                "max_batch": self.max_batch, "precision": p.precision, "backend": p.backend,
                "recurrent": p.recurrent, "env": (p.manifest.get("env") or {}).get("id"),
                "format_version": p.manifest["format_version"], "max_clients": self.max_clients,
                "request_timeout_s": self.request_timeout, "idle_timeout_s": self.idle_timeout}


class ServerError(EdgeqError):
    """The policy server answered a request with an error."""


class PolicyClient:
    """Reference client: ``with PolicyClient(port) as c: actions = c.act(obs)``."""

    def __init__(self, port: int, *, token: str | None = None, token_file: str | Path | None = None,
                 timeout: float | None = 10.0) -> None:
        """Connect and authenticate: ``token``, else the first line of ``token_file``, else the server's
        default token file for ``port`` (:func:`default_token_file`)."""
        if token is None:
            path = Path(token_file) if token_file is not None else default_token_file(port)
            try:
                token = path.read_text().strip()
            except OSError as exc:
                raise ServerError(f"{path}: cannot read the server's token ({exc.strerror}); pass token= or "
                                  "token_file=") from None
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._info: dict[str, Any] | None = None
        raw = token.encode()
        try:
            status, body = self._request(_U32.pack(AUTH) + _U32.pack(len(raw)) + raw)
        except BaseException:
            self.sock.close()
            raise
        if status != OK:
            self.sock.close()
            raise ServerError(body.decode(errors="replace"))

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
