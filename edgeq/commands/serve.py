"""``edgeq serve``: a bundle's ``act`` on a loopback TCP socket (see :mod:`edgeq.deploy.serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgeq.commands._app import app, run_guarded


@app.command()
def serve(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    port: Annotated[int, typer.Option(help="TCP port on 127.0.0.1 (0 picks a free one).")] = 7878,
    backend: Annotated[str, typer.Option(help="auto, cpu, cuda or trt.")] = "auto",
    precision: Annotated[str, typer.Option(help="int8 or fp32.")] = "int8",
    max_clients: Annotated[int, typer.Option(help="Connections served at once (an idle one gives its slot to a "
                                                  "new one; recurrent state is kept per connection).")] = 8,
    idle_timeout: Annotated[float, typer.Option(help="Close a connection idle this many seconds.")] = 60.0,
    request_timeout: Annotated[float, typer.Option(help="A request must arrive whole within this many seconds of "
                                                        "its first byte.")] = 2.0,
    token_file: Annotated[Path | None, typer.Option(help="Where to write the token clients must send to act or "
                                                         "reset (mode 0600; default: $XDG_RUNTIME_DIR or /tmp, "
                                                         "edgeq-serve-UID-PORT.token).")] = None,
    trusted_key: Annotated[list[Path] | None, typer.Option(help="Ed25519 public key that must have signed the "
                                                                "bundle (edgeq keygen); repeatable.")] = None,
    allow_unsigned: Annotated[bool, typer.Option(help="Serve a bundle whose signature is not checked.")] = False,
) -> None:
    """Serve BUNDLE's act() on 127.0.0.1 for controllers not written in Python (binary protocol in
    edgeq.deploy.serve); the robot-only equivalent is `edgeq-deploy serve`."""
    from edgeq.deploy.policy import load
    from edgeq.deploy.serve import PolicyServer

    policy = run_guarded(lambda: load(bundle, backend=backend, precision=precision, trusted_keys=trusted_key or None,
                                      allow_unsigned=allow_unsigned))
    server = run_guarded(lambda: PolicyServer(policy, port, max_clients=max_clients, idle_timeout=idle_timeout,
                                              request_timeout=request_timeout, token_file=token_file))
    server.serve_until_interrupted()
