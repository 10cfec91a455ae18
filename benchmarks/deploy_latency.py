"""Deploy runtime latency: ``act`` vs the bare backend call, per backend, precision and batch size;
a shared policy under threads; and the fixed-rate robot loop (examples/robot_loop.py) at 50 Hz and 1 kHz.

    python benchmarks/deploy_latency.py --bundle tests/fixtures/bundles/v1/sac-pendulum \\
        [--bundle other/bundle] [--backend cpu --backend cuda] [--out benchmarks/results/deploy-latency.md]

Prints a Markdown report (and writes it with --out) that starts with the exact command and the machine.
Only the deploy runtime is timed (numpy + onnxruntime); the robot loop also steps the bundle's
gymnasium env as the stand-in robot.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import edgeq.deploy
from edgeq.deploy.selftest import sample_observations

REPO = Path(__file__).resolve().parent.parent


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_name() -> str | None:
    try:
        import subprocess

        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def bench_act(policy: edgeq.deploy.DeployedPolicy, batch: int, calls: int) -> dict[str, float]:
    obs = sample_observations(policy.manifest, batch * 64, seed=0).reshape(64, batch, *policy.obs_shape)
    for i in range(min(50, calls)):  # warm-up
        policy.act(obs[i % 64][0] if batch == 1 else obs[i % 64])
    policy.reset_latency()
    t0 = time.perf_counter()
    for i in range(calls):
        policy.act(obs[i % 64][0] if batch == 1 else obs[i % 64])
    wall = time.perf_counter() - t0
    a, b = policy.latency, policy.backend_latency
    return {"act_median": a["median_us"], "act_p99": a["p99_us"], "act_p999": a["p999_us"], "act_max": a["max_us"],
            "backend_median": b["median_us"], "backend_p99": b["p99_us"],
            "obs_per_s": batch * calls / wall}


def bench_threads(policy: edgeq.deploy.DeployedPolicy, threads: int, calls: int) -> float:
    obs = sample_observations(policy.manifest, 64, seed=1)

    def work(_: int) -> None:
        for i in range(calls):
            policy.act(obs[i % 64])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    return threads * calls / (time.perf_counter() - t0)


def _robot_loop_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("robot_loop", REPO / "examples" / "robot_loop.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["robot_loop"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, action="append", help="bundle directory (repeatable)")
    ap.add_argument("--backend", action="append", help="cpu, cuda, trt (repeatable; default: cpu)")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 1, 64, 1024)")
    ap.add_argument("--calls", type=int, default=3000, help="act calls per measurement at batch 1")
    ap.add_argument("--loop-seconds", type=float, default=10.0, help="seconds per robot-loop rate (0: skip)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    bundles = args.bundle or [REPO / "tests/fixtures/bundles/v1/sac-pendulum"]
    backends = args.backend or ["cpu"]
    batches = args.batch or [1, 64, 1024]

    import onnxruntime as ort

    lines = ["## Deploy runtime latency", "",
             f"Command: `{shlex.join(['python', *sys.argv])}`", "",
             f"Machine: {_cpu_name()}, {os.cpu_count()} logical CPUs, load average "
             f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the start; "
             f"GPU: {_gpu_name() or 'none'}; Python {platform.python_version()}, numpy {np.__version__}, "
             f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())}). ONNX Runtime with one "
             "intra-op thread. `act` = the whole `DeployedPolicy.act` call (input checks, conversion, backend); "
             "`backend` = the ONNX Runtime `run` alone. Microseconds; median / p99 over the calls.", ""]
    lines += ["| bundle | backend | precision | batch | act median | act p99 | act p99.9 | backend median | "
              "backend p99 | observations/s |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    thread_rows = []
    loop_rows = []
    for bundle in bundles:
        name = bundle.name
        for backend in backends:
            for precision in ("int8", "fp32"):
                try:
                    policy = edgeq.deploy.load(bundle, backend=backend, precision=precision, allow_unsigned=True)
                except edgeq.deploy.policy.BundleError as exc:
                    lines.append(f"| {name} | {backend} | {precision} | – | not available: {exc} | | | | | |")
                    continue
                for batch in batches:
                    calls = max(20, args.calls // max(1, batch // 16))
                    r = bench_act(policy, batch, calls)
                    lines.append(f"| {name} | {backend} | {precision} | {batch} | {r['act_median']:.1f} | "
                                 f"{r['act_p99']:.1f} | {r['act_p999']:.1f} | {r['backend_median']:.1f} | "
                                 f"{r['backend_p99']:.1f} | {r['obs_per_s']:,.0f} |")
                    print(lines[-1], flush=True)
                if precision == "int8":
                    one = bench_threads(policy, 1, args.calls)
                    four = bench_threads(policy, 4, args.calls // 4)
                    thread_rows.append(f"| {name} | {backend} | {one:,.0f} | {four:,.0f} |")
                    if args.loop_seconds > 0:
                        loop_rows += _robot_loop_rows(policy, args.loop_seconds)
    lines += ["", "One int8 policy shared by threads (single observations; ONNX Runtime runs feed-forward policies' "
              "calls concurrently, the Python around them holds the GIL):",
              "", "| bundle | backend | calls/s, 1 thread | calls/s, 4 threads |", "| --- | --- | ---: | ---: |",
              *thread_rows]
    if loop_rows:
        lines += ["", f"Robot loop (`examples/robot_loop.py`, int8, {args.loop_seconds:g} s per rate, sleep then spin, "
                  "no real-time priority): a deadline miss is a tick whose work (act + env.step) ended after the "
                  "next tick's start.", "",
                  "| bundle | backend | rate | ticks | deadline misses | skipped | act p50 / p99 / max (us) | "
                  "tick work p99 (us) | wake-up lateness p50 / p99 (us) |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *loop_rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


def _robot_loop_rows(policy: edgeq.deploy.DeployedPolicy, seconds: float) -> list[str]:
    import gymnasium as gym

    loop = _robot_loop_module()
    rows = []
    name, env_id = Path(str(policy.bundle)).name, policy.manifest["env"]["id"]
    for rate in (50.0, 1000.0):
        try:
            env = gym.make(env_id, **policy.manifest["env"].get("kwargs", {}))
        except Exception as exc:  # noqa: BLE001 - e.g. MuJoCo not installed on this machine
            rows.append(f"| {name} | {policy.backend} | {rate:g} Hz | env {env_id} not available here: "
                        f"{type(exc).__name__} | | | | | |")
            continue
        try:
            rep = loop.run_loop(policy, env, rate_hz=rate, ticks=int(rate * seconds), seed=0)
        finally:
            env.close()
        rows.append(f"| {name} | {policy.backend} | {rate:g} Hz | {rep.ticks} | "
                    f"{rep.deadline_misses} ({100 * rep.miss_rate:.2f}%) | {rep.skipped_ticks} | "
                    f"{rep.act['median_us']:.0f} / {rep.act['p99_us']:.0f} / {rep.act['max_us']:.0f} | "
                    f"{rep.work['p99_us']:.0f} | {rep.wake_lateness['median_us']:.0f} / "
                    f"{rep.wake_lateness['p99_us']:.0f} |")
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
