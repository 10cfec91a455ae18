"""``edgeq-deploy`` (also ``python -m edgeq.deploy``): the robot-side command line, stdlib argparse only.

The container images' entrypoint. Every command takes a bundle directory; it defaults to
``$EDGEQ_BUNDLE`` or ``/bundle`` (where the images expect the bundle to be mounted, read-only)::

    edgeq-deploy verify   [BUNDLE]                      format version + every file's SHA-256
    edgeq-deploy selftest [BUNDLE] [--no-bundle]        health check (exit 0 healthy, 1 not)
    edgeq-deploy act      [BUNDLE] --obs '[...]'        actions as JSON (also --obs-file, or stdin lines)
    edgeq-deploy bench    [BUNDLE] --calls N --batch B  latency statistics as JSON
    edgeq-deploy serve    [BUNDLE] --port P             act over TCP on 127.0.0.1 (edgeq.deploy.serve)

Errors print one line ``error: ...`` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeq.errors import EdgeqError

DEFAULT_BUNDLE = "/bundle"


def _default_bundle() -> str:
    return os.environ.get("EDGEQ_BUNDLE", DEFAULT_BUNDLE)


def _print(data: Any) -> None:
    print(json.dumps(data, indent=None if isinstance(data, list) else 2))


def _signature_policy(args: argparse.Namespace) -> dict[str, Any]:
    """``trusted_keys`` / ``allow_unsigned`` from ``--trusted-key`` / ``--allow-unsigned``, else from
    ``$EDGEQ_TRUSTED_KEYS`` (paths separated by ``:``) / ``$EDGEQ_ALLOW_UNSIGNED=1`` (for containers)."""
    keys = list(args.trusted_key or [])
    if not keys and os.environ.get("EDGEQ_TRUSTED_KEYS"):
        keys = [k for k in os.environ["EDGEQ_TRUSTED_KEYS"].split(os.pathsep) if k]
    allow = bool(args.allow_unsigned) or os.environ.get("EDGEQ_ALLOW_UNSIGNED", "") in ("1", "true", "yes")
    return {"trusted_keys": keys or None, "allow_unsigned": allow}


def _load(args: argparse.Namespace, **kw: Any) -> Any:
    import warnings

    from edgeq.deploy.policy import load

    with warnings.catch_warnings():  # --allow-unsigned was explicit: say it once on stderr, not as a warning
        warnings.simplefilter("ignore", UserWarning)
        policy = load(args.bundle, backend=args.backend, precision=args.precision, nan_policy=args.nan_policy,
                      **_signature_policy(args), **kw)
    _say_unsigned(args)
    return policy


def _say_unsigned(args: argparse.Namespace) -> None:
    policy = _signature_policy(args)
    if policy["trusted_keys"] is None and policy["allow_unsigned"]:
        print(f"warning: {args.bundle}: signature not checked (--allow-unsigned): nothing proves who made this "
              "bundle", file=sys.stderr)


def cmd_verify(args: argparse.Namespace) -> int:
    import warnings

    from edgeq.deploy.bundle_format import read_manifest
    from edgeq.deploy.signing import read_signature

    policy = _signature_policy(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        m = read_manifest(args.bundle, verify=True, **policy)
    _say_unsigned(args)
    sig = read_signature(Path(args.bundle))
    signature = (f"verified (key {sig['key_id']})" if policy["trusted_keys"] else "not checked") if sig else "unsigned"
    _print({"bundle": str(args.bundle), "signature": signature, "format_version": m["format_version"],
            "edgeq_version": m.get("edgeq_version"),
            "env": (m.get("env") or {}).get("id"), "algorithm": m.get("source", {}).get("algorithm"),
            "models": m["models"], "engines": [e.get("file") for e in m.get("engines", [])],
            "decision": m["decision"]["status"] if "decision" in m else None, "files_verified": sorted(m["files"])})
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from edgeq.deploy.selftest import run_selftest

    bundle = None if args.no_bundle else args.bundle
    if bundle is not None and not Path(bundle).exists() and args.bundle == _default_bundle() and args.optional:
        bundle = None
    report = run_selftest(bundle, **_signature_policy(args), backend=args.backend, precision=args.precision,
                          samples=args.samples,
                          latency_calls=args.latency_calls, max_p99_us=args.max_p99_us, reference=args.reference,
                          reference_atol=args.reference_atol)
    if args.json:
        _print(report)
    else:
        for c in report["checks"]:
            print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']:<13} {c['detail']}")
        print("healthy" if report["ok"] else "unhealthy")
    return 0 if report["ok"] else 1


def _observations(args: argparse.Namespace) -> list[Any]:
    if args.obs is not None:
        return [json.loads(args.obs)]
    if args.obs_file is not None:
        return [json.loads(Path(args.obs_file).read_text())]
    return [json.loads(line) for line in sys.stdin if line.strip()]


def cmd_act(args: argparse.Namespace) -> int:
    policy = _load(args)
    try:
        inputs = _observations(args)
    except json.JSONDecodeError as exc:
        raise EdgeqError(f"observation is not valid JSON ({exc}); expected a list of numbers or a list of "
                         "lists") from None
    for obs in inputs:
        print(json.dumps(policy.act(obs).tolist()), flush=True)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from edgeq.deploy.selftest import sample_observations

    policy = _load(args)
    obs = sample_observations(policy.manifest, args.batch * min(args.calls, 256), seed=0)
    obs = obs.reshape(-1, args.batch, *policy.obs_shape)
    for i in range(args.calls):
        x = obs[i % len(obs)]
        policy.act(x[0] if args.batch == 1 else x)
    _print({"backend": policy.backend, "precision": policy.precision, "providers": policy.providers,
            "batch": args.batch, "act_us": policy.latency, "backend_us": policy.backend_latency})
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from edgeq.deploy.serve import PolicyServer

    policy = _load(args)
    server = PolicyServer(policy, args.port, max_clients=args.max_clients, idle_timeout=args.idle_timeout,
                          request_timeout=args.request_timeout, token_file=args.token_file)

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    server.serve_until_interrupted()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeq-deploy", description="Run and check edgeq bundles on the robot "
                                     "(needs only numpy and onnxruntime or TensorRT).")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, *, policy: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("bundle", nargs="?", default=_default_bundle(),
                       help=f"bundle directory (default: $EDGEQ_BUNDLE or {DEFAULT_BUNDLE})")
        p.add_argument("--trusted-key", action="append", default=None, metavar="KEY.pub",
                       help="an Ed25519 public key (edgeq keygen) that must have signed the bundle; repeatable "
                            "(default: $EDGEQ_TRUSTED_KEYS, paths separated by ':')")
        p.add_argument("--allow-unsigned", action="store_true",
                       help="accept a bundle whose signature is not checked (default: $EDGEQ_ALLOW_UNSIGNED=1)")
        if policy:
            p.add_argument("--backend", default="auto",
                           choices=["auto", "cpu", "cuda", "cuda-fused", "cuda-ort", "trt"])
            p.add_argument("--precision", default="int8", choices=["int8", "fp32"])
            p.add_argument("--nan-policy", default="error", choices=["error", "zero", "pass"])
        return p

    command("verify", "Check the bundle's format version and every file's SHA-256.", policy=False)
    p = command("selftest", "Health check of the runtime and the bundle; exit 0 if healthy.")
    p.add_argument("--no-bundle", action="store_true", help="check the runtime only")
    p.add_argument("--optional", action="store_true",
                   help="check the runtime only if no bundle is mounted at the default path")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--latency-calls", type=int, default=200)
    p.add_argument("--max-p99-us", type=float, default=None, help="fail if the p99 act latency is above this")
    p.add_argument("--reference", default=None, help="JSON file of observations and expected actions")
    p.add_argument("--reference-atol", type=float, default=None,
                   help="largest allowed difference (default: 1%% of the action scale)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p = command("act", "Print the policy's actions for observations given as JSON.")
    p.add_argument("--obs", default=None, help="one observation or a batch, as JSON")
    p.add_argument("--obs-file", default=None, help="a JSON file holding one observation or a batch")
    p = command("bench", "Time act() calls and print latency statistics.")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--batch", type=int, default=1)
    p = command("serve", "Serve act() over TCP on 127.0.0.1 (see edgeq.deploy.serve for the protocol).")
    p.add_argument("--port", type=int, default=7878)
    p.add_argument("--max-clients", type=int, default=8)
    p.add_argument("--idle-timeout", type=float, default=60.0, help="close a connection idle this many seconds")
    p.add_argument("--request-timeout", type=float, default=2.0,
                   help="a request must arrive whole within this many seconds of its first byte")
    p.add_argument("--token-file", default=None,
                   help="where to write the token clients must send (mode 0600; default: $EDGEQ_SERVE_TOKEN_FILE "
                        "or $XDG_RUNTIME_DIR (else /tmp)/edgeq-serve-UID-PORT.token)")
    return parser


COMMANDS = {"verify": cmd_verify, "selftest": cmd_selftest, "act": cmd_act, "bench": cmd_bench, "serve": cmd_serve}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except EdgeqError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RecursionError, MemoryError) as exc:  # anything else is still one line, exit 2
        print(f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
