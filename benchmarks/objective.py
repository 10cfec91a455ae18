"""How well does each offline proxy predict the measured return loss? Spearman rank correlations.

Reads the rows benchmarks/int8_methods.py wrote (one per fixture x method: the all-INT8 file's
measured return kept on paired episodes, and the proxies the planner computed on held-out states)
and reports, per fixture and pooled (return loss in % of the float mean), the Spearman rank
correlation (scipy.stats.spearmanr) between the return loss and each proxy:

* ``plain``: the mean held-out action error (|a_int8 - a_float| / half-range);
* ``score``: the planner's score (mean + 0.1 x CVaR of the worst 1% states);
* ``weighted``: the action error weighted by the critic's value sensitivity (issue 12 part 2);
* ``value loss``: the critic's own estimate of the value lost, Q(s, a_float) - Q(s, a_int8), relative.

    python benchmarks/objective.py --jsonl benchmarks/results/int8_methods.jsonl --out benchmarks/results/objective.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import append_section  # noqa: E402

PROXIES = {"plain": "heldout_mean", "score": "heldout_score", "weighted": "heldout_weighted",
           "value loss": "critic_value_loss"}


def correlations(rows: list[dict[str, Any]]) -> dict[str, tuple[float, float, int]]:
    """Proxy name -> (Spearman rho, p-value, n) against the return loss of ``rows``."""
    from scipy.stats import spearmanr

    out: dict[str, tuple[float, float, int]] = {}
    for name, key in PROXIES.items():
        pairs = [(1.0 - r["kept"], r[key]) for r in rows if r.get(key) is not None]
        if len(pairs) < 3:
            continue
        loss, proxy = zip(*pairs, strict=True)
        res = spearmanr(loss, proxy)
        out[name] = (float(res.statistic), float(res.pvalue), len(pairs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jsonl", action="append", required=True)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "objective.md"))
    args = ap.parse_args()
    command = "python benchmarks/objective.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows: list[dict[str, Any]] = []
    for path in args.jsonl:
        rows += [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:  # the last measurement of a fixture x method wins
        seen[(r["fixture"], r["method"])] = r
    # methods whose stages were all rejected produce the very same file as another method: count it once
    unique: dict[tuple[str, float, float], dict[str, Any]] = {}
    for r in seen.values():
        unique.setdefault((r["fixture"], round(r["int8_mean"], 3), round(r["heldout_mean"], 6)), r)
    rows = list(unique.values())
    fixtures = sorted({r["fixture"] for r in rows})
    lines = ["### Proxy vs measured return loss (Spearman rank correlation)", "", f"Command: `{command}`", "",
             "Return loss = 1 - kept of `policy.int8.onnx` (every layer W8A8) on ONNX Runtime CPU, paired "
             "episodes as in int8_methods.md; one point per fixture x distinct INT8 file (methods that "
             "produced the same file count once). rho > 0: a larger proxy "
             "predicts a larger loss.", "",
             "| fixtures | points | " + " | ".join(f"{p} rho (p)" for p in PROXIES) + " |",
             "|---|---|" + "---|" * len(PROXIES)]
    real = [r for r in rows if not r["method"].startswith("coarse")]
    groups = ([(f, [r for r in rows if r["fixture"] == f]) for f in fixtures] + [("pooled", rows)]
              + [(f"{f}, without the coarse stand-ins", [r for r in real if r["fixture"] == f]) for f in fixtures]
              + [("pooled, without the coarse stand-ins", real)])
    for name, group in groups:
        c = correlations(group)
        cells = [f"{c[p][0]:+.2f} ({c[p][1]:.2g}, n={c[p][2]})" if p in c else "-" for p in PROXIES]
        lines.append(f"| {name} | {len(group)} | " + " | ".join(cells) + " |")
    append_section(Path(args.out), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
