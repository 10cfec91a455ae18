"""Join chunks of explicit-seed validations into one fixed-N verdict per file (issue 12).

``benchmarks/device_verdicts.sh`` validates a bundle on seed chunks (``edgeq validate --seeds A-B``), each
one look with no decision kept. This joins every chunk of a bundle, checks that the seeds are disjoint
and contiguous from the first, and applies edgeq's own verdict (:func:`edgeq.validate.verdict.judge`,
fixed design: Student-t interval on the paired differences, exact McNemar on failures) to the whole
pre-registered N at once, for the cpu target's file and for the all-INT8 file's row.

    python benchmarks/merge_verdicts.py /tmp/chunks --name sac-hopper --expect 3000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeq.validate.sequential import fixed_design  # noqa: E402
from edgeq.validate.verdict import Tolerance, judge  # noqa: E402


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One target result from chunk results (same bundle, disjoint seeds), in seed order."""
    out: dict[str, Any] = {"float": {"returns": [], "outcomes": []}, "int8": {"returns": [], "outcomes": []}}
    for p in parts:
        for side in ("float", "int8"):
            out[side]["returns"] += list(p[side]["returns"])
            out[side]["outcomes"] += list(p[side]["outcomes"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="the chunk folders NAME-A-B/validation.json")
    ap.add_argument("--name", required=True)
    ap.add_argument("--expect", type=int, required=True, help="the pre-registered N (refuses any other)")
    ap.add_argument("--rel-tol", type=float, default=0.01)
    args = ap.parse_args()
    chunks = []
    for d in args.folder.glob(f"{args.name}-*-*"):
        if d.is_dir() and (d / "validation.json").is_file():
            a, b = (int(x) for x in d.name.rsplit("-", 2)[1:])
            chunks.append((a, b, json.loads((d / "validation.json").read_text())))
    chunks.sort(key=lambda c: c[0])
    seeds = [s for c in chunks for s in c[2]["seeds"]]
    if len(seeds) != args.expect or seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        sys.exit(f"{args.name}: {len(seeds)} seeds in the chunks, not the {args.expect} contiguous seeds expected")
    tol = Tolerance(relative=args.rel_tol)
    for role, key in (("cpu target", "cpu"), ("all-INT8 file on cpu", "all_int8_cpu")):
        if key != "cpu" and not all(key in c[2] for c in chunks):
            continue  # the bundle's cpu file is its all-INT8 file (no specialized CPU copy): one row
        parts = [c[2]["targets"]["cpu"] if key == "cpu" else c[2][key] for c in chunks]
        merged = merge(parts)
        v = judge(merged, tol, fixed_design())
        f = sum(merged["float"]["returns"]) / len(seeds)
        q = sum(merged["int8"]["returns"]) / len(seeds)
        fails = v["failures"]
        print(f"{args.name} | {parts[0]['int8_model']} ({role}) | seeds {seeds[0]}..{seeds[-1]} (N={len(seeds)}) | "
              f"float {f:.1f} int8 {q:.1f} ({100 * (1 + (q - f) / abs(f)):.2f}%) | diff {v['returns']['mean']:+.2f} "
              f"[{v['returns']['interval'][0]:+.2f}, {v['returns']['interval'][1]:+.2f}] "
              f"band -{v['returns']['band_size']:.2f} | "
              f"falls float {fails.get('float_failures')} / int8 {fails.get('int8_failures')} | **{v['status']}**"
              f"{'' if v['status'] == 'PASS' else ' (' + '; '.join(v.get('reasons', [])) + ')'}")


if __name__ == "__main__":
    main()
