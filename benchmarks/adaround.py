"""AdaRound variants on real policy layers: output error on held-out states and time.

For each weighted layer of a fixture, with inputs from calibration rollouts (fake-quantized with
the layer's percentile-99.99 input scale, as the int8 graph feeds it) and held-out states from other
episodes, compares nearest rounding, AdaRound's soft-rounding stage (Adam on the rectified
sigmoid, then the flip polish) and the flip polish alone (exact coordinate descent on the same
objective, starting from nearest).

    python benchmarks/adaround.py --fixture sac-halfcheetah:HalfCheetah-v5 --fixture sac-pendulum:Pendulum-v1
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from edgeq.calibration.collect import ExplorationNoise, calibrate_rollouts, tensor_values
    from edgeq.envs import env_factory
    from edgeq.graph.analysis import constant_value, find_weighted_layers
    from edgeq.ingest.sb3 import load_sb3
    from edgeq.quantizers.adaround import adaround, output_error
    from edgeq.quantizers.transforms import weight_in_view
    from edgeq.quantizers.weights import quantize_weight

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixture", action="append", required=True, help="NAME:ENV (repeatable)")
    ap.add_argument("--soft-iters", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adaround.md"))
    args = ap.parse_args()
    command = "python benchmarks/adaround.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = ["### AdaRound on policy layers: held-out output MSE relative to nearest rounding", "",
             f"Command: `{command}`", "",
             "| fixture | layer | nearest MSE | soft stage + polish | time | polish only | time |",
             "|---|---|---|---|---|---|---|"]
    for spec in args.fixture:
        name, env = spec.split(":", 1)
        policy = load_sb3(ROOT / "tests" / "fixtures" / "policies" / f"{name}.zip")
        n_cal = 10 if "Pendulum" not in env else 20
        stats = calibrate_rollouts(policy, env_factory(env), list(range(1_000_000, 1_000_000 + n_cal)),
                                   noise=ExplorationNoise(0.1), holdout_seeds=[2_000_000, 2_000_001])
        assert stats.holdout is not None
        for wl in find_weighted_layers(policy.model):
            w = weight_in_view(np.asarray(constant_value(policy.model, wl.weight), np.float32), wl)
            xc = tensor_values(policy.model, stats.observations, [wl.input])[wl.input]
            xh = tensor_values(policy.model, stats.holdout, [wl.input])[wl.input]
            s = np.float32(np.percentile(np.abs(xc), 99.99) / 127)

            def fq(x: np.ndarray, s: np.float32 = s) -> np.ndarray:
                return (np.clip(np.rint(x / s), -127, 127) * s).astype(np.float32)

            near = quantize_weight(w, axis=0)
            base = output_error(fq(xh), near.dequantize(), xh, w)
            cells = []
            for iters in (args.soft_iters, 0):
                t0 = time.perf_counter()
                r = adaround(w, near, fq(xc), xc, iters=iters)
                sec = time.perf_counter() - t0
                cells.append((output_error(fq(xh), r.weight.dequantize(), xh, w) / base, sec, r.used))
            lines.append(f"| {name} | {wl.node} ({w.shape[0]}x{w.shape[1]}) | {base:.3g} | "
                         f"{cells[0][0]:.3f}{'' if cells[0][2] else ' (rejected)'} | {cells[0][1]:.1f}s | "
                         f"{cells[1][0]:.3f}{'' if cells[1][2] else ' (rejected)'} | {cells[1][1]:.1f}s |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
