"""A fixed-rate control loop: an edgeq bundle drives a gymnasium env standing in for the robot.

Each tick of period ``1/rate`` reads the observation, calls ``policy.act`` and applies the action
(``env.step``, the stand-in for writing the actuator command and letting the robot move). A tick
misses its deadline when that work is not done by the start of the next tick; the ticks whose
start has then already passed are skipped (the loop resumes on the next tick in the future), as a
real-time loop would. Reported: deadline misses,
skipped ticks, and percentiles of the ``act`` latency, of the whole tick's work and of the wake-up
lateness (how late the loop woke for a tick).

    python examples/robot_loop.py BUNDLE                      # 50 Hz and 1 kHz, 5 s each
    python examples/robot_loop.py BUNDLE --rate 1000 --seconds 10 --backend cpu --json

On a robot, run it pinned to an isolated core with a real-time priority (``--cpu 3 --fifo 80``,
which need the privileges to set them). The robot side needs only ``edgeq.deploy`` (numpy +
onnxruntime); this example also imports gymnasium for the simulated robot.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import edgeq.deploy

SPIN_S = 200e-6  # sleep until this long before a tick, then spin: time.sleep alone wakes ~60 us late


def _percentiles(x: list[float]) -> dict[str, float]:
    if not x:
        return {}
    a = np.asarray(x) * 1e6
    p50, p90, p99, p999 = np.percentile(a, [50, 90, 99, 99.9])
    return {"median_us": float(p50), "p90_us": float(p90), "p99_us": float(p99), "p999_us": float(p999),
            "max_us": float(a.max())}


@dataclass
class LoopReport:
    rate_hz: float
    period_us: float
    ticks: int
    deadline_misses: int
    skipped_ticks: int
    act: dict[str, float]
    work: dict[str, float]
    wake_lateness: dict[str, float]
    episode_returns: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list, repr=False)

    @property
    def miss_rate(self) -> float:
        return self.deadline_misses / max(self.ticks, 1)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("rewards")
        return {**d, "miss_rate": self.miss_rate}


def _wait_until(t: float, spin: bool) -> None:
    remaining = t - time.perf_counter()
    if remaining > SPIN_S or (not spin and remaining > 0):
        time.sleep(max(0.0, remaining - (SPIN_S if spin else 0.0)))
    if spin:
        while time.perf_counter() < t:
            pass


def run_loop(policy: Any, env: Any, *, rate_hz: float, ticks: int, seed: int = 0, spin: bool = True) -> LoopReport:
    """Run ``ticks`` control ticks at ``rate_hz``; episodes restart with seeds ``seed, seed+1, ...``."""
    period = 1.0 / rate_hz
    episode = 0
    obs, _ = env.reset(seed=seed)
    policy.reset()
    act_t: list[float] = []
    work_t: list[float] = []
    late_t: list[float] = []
    rewards: list[float] = []
    returns: list[float] = []
    ret = 0.0
    misses = skipped = 0
    t0 = time.perf_counter() + period
    k = 0
    for _ in range(ticks):
        tick = t0 + k * period
        _wait_until(tick, spin)
        start = time.perf_counter()
        action = policy.act(obs)
        ready = time.perf_counter()
        obs, reward, terminated, truncated, _ = env.step(action)
        rewards.append(float(reward))
        ret += float(reward)
        if terminated or truncated:
            returns.append(ret)
            ret, episode = 0.0, episode + 1
            obs, _ = env.reset(seed=seed + episode)
            policy.reset()
        end = time.perf_counter()
        act_t.append(ready - start)
        work_t.append(end - start)
        late_t.append(start - tick)
        k += 1
        if end > t0 + k * period:
            misses += 1
            behind = int((end - t0) // period) + 1 - k  # ticks whose start already passed
            if behind > 0:
                skipped += behind
                k += behind
    return LoopReport(rate_hz=rate_hz, period_us=period * 1e6, ticks=ticks, deadline_misses=misses,
                      skipped_ticks=skipped, act=_percentiles(act_t), work=_percentiles(work_t),
                      wake_lateness=_percentiles(late_t), episode_returns=returns, rewards=rewards)


def _realtime(cpu: int | None, fifo: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    if fifo is not None:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(fifo))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--env", default=None, help="gymnasium id (default: the bundle's env)")
    ap.add_argument("--rate", type=float, action="append", help="loop rate in Hz (repeatable; default 50 and 1000)")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each loop")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-spin", action="store_true", help="sleep only (lower CPU use, later wake-ups)")
    ap.add_argument("--cpu", type=int, default=None, help="pin the loop to this CPU core")
    ap.add_argument("--fifo", type=int, default=None, help="SCHED_FIFO priority (needs CAP_SYS_NICE)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--trusted-key", action="append", default=None,
                    help="public key (edgeq keygen) that must have signed the bundle; repeatable")
    ap.add_argument("--allow-unsigned", action="store_true", help="run a bundle whose signature is not checked")
    args = ap.parse_args(argv)

    import gymnasium as gym

    _realtime(args.cpu, args.fifo)
    policy = edgeq.deploy.load(args.bundle, backend=args.backend, precision=args.precision,
                               trusted_keys=args.trusted_key, allow_unsigned=args.allow_unsigned)
    env_id = args.env or policy.manifest["env"]["id"]
    reports = []
    for rate in args.rate or [50.0, 1000.0]:
        env = gym.make(env_id, **policy.manifest["env"].get("kwargs", {}))
        try:
            rep = run_loop(policy, env, rate_hz=rate, ticks=max(1, round(rate * args.seconds)), seed=args.seed,
                           spin=not args.no_spin)
        finally:
            env.close()
        d = {"env": env_id, "backend": policy.backend, "precision": policy.precision, **rep.to_json()}
        reports.append(d)
        if args.json:
            continue
        print(f"{env_id} at {rate:g} Hz ({policy.precision} on {policy.backend}): {rep.ticks} ticks, "
              f"{rep.deadline_misses} deadline misses ({100 * rep.miss_rate:.2f}%), {rep.skipped_ticks} skipped")
        for name in ("act", "work", "wake_lateness"):
            s = getattr(rep, name)
            print(f"  {name:<13} median {s['median_us']:7.1f} us  p99 {s['p99_us']:7.1f} us  "
                  f"p99.9 {s['p999_us']:7.1f} us  max {s['max_us']:7.1f} us")
        if rep.episode_returns:
            print(f"  episodes: {len(rep.episode_returns)}, mean return {np.mean(rep.episode_returns):.1f}")
    if args.json:
        print(json.dumps(reports, indent=2))
    return reports


if __name__ == "__main__":
    main()
