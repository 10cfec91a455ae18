"""Matplotlib figures of a validation, each returned as PNG bytes (Agg backend, no display needed).

Every function reads the JSON produced by the validator (``validation.json``), so a report can be
rebuilt from a bundle without re-running anything.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

FLOAT_COLOR, INT8_COLOR, FLOOR_COLOR = "#4C72B0", "#DD8452", "#8C8C8C"
PALETTE = ("#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#CCB974", "#64B5CD")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _capped_sqnr(row: dict[str, Any], cap: float = 120.0) -> float:
    """SQNR for a bar: ``None`` with zero error (identical outputs) is drawn at ``cap``; unmeasured is NaN."""
    if "sqnr_db" not in row:
        return float("nan")
    v = row["sqnr_db"]
    return cap if v is None else min(float(v), cap)


def _jitter(n: int, center: float, width: float = 0.12) -> np.ndarray:
    return center + np.linspace(-width, width, n) if n > 1 else np.full(n, center)


def returns_plot(groups: Sequence[tuple[str, Sequence[float]]], title: str,
                 colors: Sequence[str] | None = None) -> bytes:
    """Episode returns per group (box + every episode as a dot, in ``colors[i]``)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(groups) + 2), 3.6))
    data = [np.asarray(v, float) for _, v in groups]
    ax.boxplot(data, widths=0.5, showfliers=False)
    for i, (_, v) in enumerate(groups):
        color = colors[i] if colors is not None else PALETTE[i % len(PALETTE)]
        ax.scatter(_jitter(len(v), i + 1), v, s=14, color=color, alpha=0.8, zorder=3)
    ax.set_xticks(range(1, len(groups) + 1), [g for g, _ in groups], rotation=15)
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def paired_plot(panels: Sequence[dict[str, Any]]) -> bytes:
    """Per-seed ``candidate - float`` with the verdict's interval and band, next to the noise-floor draws.

    Each panel: ``title``, ``seeds``, ``diff`` (per seed), ``ci`` [lo, hi] (``ci_label`` names it),
    optional ``band`` [lo, hi or None] (the tolerance band's edges) and ``floor`` [draws][seeds] of
    floor differences (the first seeds).
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.5, 4.8 * len(panels)), 3.4), squeeze=False)
    for ax, p in zip(axes[0], panels, strict=True):
        x = np.arange(len(p["seeds"]))
        if p.get("floor") is not None:
            fl = np.asarray(p["floor"], float)
            for k, row in enumerate(fl):
                ax.scatter(x[: len(row)], row, marker="x", s=14, color=FLOOR_COLOR, alpha=0.7,
                           label="float + 1e-6 noise (floor)" if k == 0 else None)
        ax.bar(x, p["diff"], color=INT8_COLOR, alpha=0.85, label="int8 - float")
        lo, hi = p["ci"]
        ax.axhspan(lo, hi, color=INT8_COLOR, alpha=0.15, label=p.get("ci_label", "95% CI of mean"))
        band = p.get("band")
        if band:
            for k, edge in enumerate(band):
                if edge is not None and np.isfinite(edge):
                    ax.axhline(edge, color="black", lw=1, ls="--", label="tolerance band" if k == 0 else None)
        ax.axhline(np.mean(p["diff"]), color=INT8_COLOR, lw=1)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, [str(s) for s in p["seeds"]], fontsize=7, rotation=90 if len(x) > 20 else 0)
        ax.set_xlabel("seed")
        ax.set_ylabel("return difference")
        ax.set_title(p["title"])
        ax.legend(fontsize=7, loc="best")
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def action_error_plot(series: dict[str, Any], per_dim: dict[str, Any]) -> bytes:
    """|a_int8 - a_float| along one float episode (left) and its distribution per action dim (right)."""
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [2, 1]})
    err = np.asarray(series["abs_error"], float)
    for d in range(err.shape[1]):
        ax.plot(err[:, d], lw=0.8, label=f"a[{d}]" if err.shape[1] <= 8 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("|a_int8 - a_float|")
    ax.set_title(f"action error along the float episode (seed {series['seed']})")
    if err.shape[1] <= 8:
        ax.legend(fontsize=7, ncol=min(4, err.shape[1]))
    ax.grid(alpha=0.3)
    dims = np.arange(len(per_dim["per_dim_mean_abs"]))
    w = 0.27
    bx.bar(dims - w, per_dim["per_dim_mean_abs"], w, label="mean")
    bx.bar(dims, per_dim["per_dim_p99_abs"], w, label="p99")
    bx.bar(dims + w, per_dim["per_dim_max_abs"], w, label="max")
    bx.set_xticks(dims, [f"a[{d}]" for d in dims], fontsize=7)
    bx.set_yscale("log")
    bx.set_title("per-step error per action dim")
    bx.legend(fontsize=7)
    bx.grid(axis="y", alpha=0.3)
    return _png(fig)


def divergence_plot(curves: Sequence[tuple[str, dict[str, Any]]]) -> bytes:
    """Median (and p90) normalized observation distance of candidate vs float trajectories per step."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    positive = [v for _, div in curves for v in div.get("p90", []) if v > 0]
    floor = max(min(positive), 1e-9) / 2 if positive else 1e-9
    for i, (label, div) in enumerate(curves):
        if not div.get("steps"):
            continue
        color = PALETTE[i % len(PALETTE)]
        med, p90 = np.asarray(div["median"], float), np.asarray(div["p90"], float)
        t = np.arange(len(med))
        ax.plot(t, np.maximum(med, floor), color=color, label=f"{label} median")
        ax.plot(t, np.maximum(p90, floor), color=color, ls="--", lw=0.8, label=f"{label} p90")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xlabel("step")
    ax.set_ylabel("obs distance (RMS of diff / std)")
    ax.set_title("trajectory divergence from float, same seed")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


def per_layer_plot(per_layer: dict[str, Any]) -> bytes:
    """SQNR at each fused boundary (left) and each layer's share of the action error (right)."""
    plt = _plt()
    layers = per_layer["layers"]
    ranking = per_layer.get("ranking") or []
    fig, axes = plt.subplots(1, 2 if ranking else 1, figsize=(11 if ranking else 6.5, 0.45 * len(layers) + 1.8),
                             squeeze=False)
    ax = axes[0][0]
    names = [r["node"] for r in layers]
    sqnr = [_capped_sqnr(r) for r in layers]
    y = np.arange(len(names))
    ax.barh(y, sqnr, color=INT8_COLOR)
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR int8 vs float (dB, higher is better)")
    ax.set_title("error at fused layer outputs")
    ax.grid(axis="x", alpha=0.3)
    if ranking:
        bx = axes[0][1]
        rn = [r["node"] for r in ranking]
        bx.barh(np.arange(len(rn)), [100 * r["share"] for r in ranking], color=PALETTE[2])
        bx.set_yticks(np.arange(len(rn)), rn, fontsize=7)
        bx.invert_yaxis()
        bx.set_xlabel("share of action error (%), one layer int8 at a time")
        bx.set_title("which layer costs the most")
        bx.grid(axis="x", alpha=0.3)
    return _png(fig)


def latency_plot(panels: Sequence[tuple[str, dict[str, Any]]]) -> bytes:
    """Batch-1 latency histograms (log-spaced bins) per target, one colour per model."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.5, 5.0 * len(panels)), 3.2), squeeze=False)
    for ax, (title, lat) in zip(axes[0], panels, strict=True):
        for i, (name, m) in enumerate(lat["models"].items()):
            h = m["batch1_histogram"]
            edges = 10 ** np.asarray(h["log10_us_edges"])
            color = FLOAT_COLOR if name == "float" else INT8_COLOR if name == "int8" else PALETTE[i % len(PALETTE)]
            ax.stairs(h["counts"], edges, color=color, fill=True, alpha=0.45,
                      label=f"{name}: median {m['batch1']['median_us']:.0f} us, p99.9 {m['batch1']['p999_us']:.0f} us")
            ax.axvline(m["batch1"]["p99_us"], color=color, ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch-1 latency (us); dotted: p99")
        ax.set_ylabel("calls")
        ax.set_title(title)
        ax.legend(fontsize=7)
    return _png(fig)


def sensitivity_plot(sens: dict[str, Any], floor: dict[str, Any] | None, int8_mean: float | None) -> bytes:
    """Float return vs injected action noise, the tolerance band, the floor, and int8's operating point."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    levels = sens["levels"]
    x = np.asarray([r["sigma"] for r in levels])
    y = np.asarray([r["mean"] for r in levels])
    lo = y - np.asarray([r["min_draw_mean"] for r in levels])
    hi = np.asarray([r["max_draw_mean"] for r in levels]) - y
    ax.errorbar(x, y, yerr=[lo, hi], marker="o", color=FLOAT_COLOR, capsize=3,
                label="float + action noise (mean; bars: min/max over draws)")
    base = sens["float_mean"]
    band = sens["tolerance"] * abs(base)
    ax.axhline(base, color="black", lw=0.8, label="float, no noise")
    ax.axhspan(base - band, base + band, color="green", alpha=0.1, label=f"tolerance ±{sens['tolerance']:.1%}")
    if floor is not None:
        fm = base + floor["mean_difference"]
        ax.errorbar([floor["relative_noise"]], [fm],
                    yerr=[[fm - (base + floor["band"][0])], [(base + floor["band"][1]) - fm]],
                    marker="s", color=FLOOR_COLOR, capsize=3, label="noise floor (1e-6)")
    if sens.get("int8_normalized_rms") is not None and int8_mean is not None:
        ax.scatter([max(sens["int8_normalized_rms"], 1e-7)], [int8_mean], marker="*", s=180, color=INT8_COLOR,
                   zorder=5, label=f"int8 (action RMS error {sens['int8_normalized_rms']:.2g} of half-range)")
    if sens.get("budget_sigma"):
        ax.axvline(sens["budget_sigma"], color=PALETTE[2], ls="--", lw=1,
                   label=f"error budget ≈ {sens['budget_sigma']:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("action noise std / action half-range")
    ax.set_ylabel("mean return")
    ax.set_title("sensitivity: return vs action error")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    return _png(fig)


def per_layer_compare_plot(per_layer: dict[str, dict[str, Any]]) -> bytes:
    """SQNR at each fused layer output, one bar group per layer, one colour per candidate."""
    plt = _plt()
    nodes: list[str] = []
    for pl in per_layer.values():
        for r in pl["layers"]:
            if r["node"] not in nodes:
                nodes.append(r["node"])
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(nodes) * max(1, len(per_layer)) / 2 + 3), 3.6))
    width = 0.8 / max(1, len(per_layer))
    x = np.arange(len(nodes))
    for i, (name, pl) in enumerate(per_layer.items()):
        by = {r["node"]: _capped_sqnr(r) for r in pl["layers"]}
        ax.bar(x + (i - (len(per_layer) - 1) / 2) * width, [by.get(n, np.nan) for n in nodes], width,
               label=name, color=PALETTE[i % len(PALETTE)])
    ax.set_xticks(x, nodes, fontsize=7, rotation=15)
    ax.set_ylabel("SQNR vs float (dB)")
    ax.set_title("error at fused layer outputs")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def action_error_compare_plot(series: dict[str, dict[str, Any]]) -> bytes:
    """Max-over-dims |a_candidate - a_float| along the same float episode, one line per candidate."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 3.3))
    seed = None
    for i, (name, s) in enumerate(series.items()):
        err = np.asarray(s["abs_error"], float)
        seed = s["seed"]
        ax.plot(np.maximum(err.max(axis=1), 1e-9), lw=0.8, color=PALETTE[i % len(PALETTE)], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("max over dims |Δa|")
    ax.set_title(f"action error along the float episode (seed {seed})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)
