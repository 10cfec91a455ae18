"""The tail of the action error of quantized policy files on float-visited states (issue 12 part 4).

For each file: |a_q - a_float| / half-range on the states the bundle's float policy visits (seeds 1000000..,
the search's state seeds), its mean, and the 99th percentile / maximum over states of the largest action
dimension; one markdown row per file, on ONNX Runtime CPU.

    python benchmarks/low_bit_tail.py --bundle B --file "W8A8=B/policy.int8.onnx" \\
        --file "W4A8 gptq+brecq=S/candidates/W4A8+gptq+brecq/policy.int8.cpu.onnx"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from edgeq.deploy.bundle_format import read_manifest
    from edgeq.deploy.runtime import OrtPolicy
    from edgeq.envs import env_factory_for
    from edgeq.search import _float_states

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, help="the base bundle (float policy, env, action space)")
    ap.add_argument("--file", action="append", default=[], help="LABEL=PATH of a quantized ONNX file (repeatable)")
    ap.add_argument("--episodes", type=int, default=6)
    ap.add_argument("--max-states", type=int, default=6000)
    args = ap.parse_args()
    b = Path(args.bundle)
    m = read_manifest(b, verify=False)
    fm = (b / m["models"]["fp32"]).read_bytes()
    states = _float_states(fm, m["io"], env_factory_for(m["env"]), args.episodes, 8, args.max_states)
    hr = (np.asarray(m["action_space"]["high"]) - np.asarray(m["action_space"]["low"])) / 2
    io = m["io"]
    ref = OrtPolicy(fm, input_name=io.get("input", "obs"), output_name=io.get("output", "actions")).act(states)
    print(f"{len(states)} states\n\n| file | mean | p99 (worst dim) | max |\n|---|---|---|---|")
    for spec in args.file:
        label, path = spec.split("=", 1)
        pol = OrtPolicy(Path(path).read_bytes(), input_name=io.get("input", "obs"),
                        output_name=io.get("output", "actions"))
        e = np.abs(pol.act(states) - ref) / hr
        worst = e.max(axis=1)
        print(f"| {label} | {e.mean():.4f} | {np.percentile(worst, 99):.3f} | {worst.max():.3f} |")


if __name__ == "__main__":
    main()
