"""``report.html`` (one self-contained file, plots embedded as base64 PNG, opens offline) and
``report.md`` (plots as PNG files in ``report/``) from a validation's JSON.

Both are rendered from the same list of sections, so they always say the same thing.
"""

from __future__ import annotations

import base64
import html
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeq.deploy.contracts import ValidationResult
from edgeq.validate import plots

REPORT_HTML, REPORT_MD, REPORT_DIR = "report.html", "report.md", "report"


@dataclass
class Section:
    """A titled part of a report: paragraphs, tables and plots, in order."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def p(self, text: str) -> Section:
        self.blocks.append(("p", text))
        return self

    def table(self, headers: list[str], rows: list[list[Any]]) -> Section:
        self.blocks.append(("table", (headers, rows)))
        return self

    def img(self, key: str, png: bytes, alt: str) -> Section:
        self.blocks.append(("img", (key, png, alt)))
        return self

    def verdict(self, status: str, text: str) -> Section:
        """A coloured banner: ``status`` is PASS, FAIL or INCONCLUSIVE."""
        self.blocks.append(("verdict", (status, text)))
        return self


def fmt(x: Any, digits: int = 4) -> str:
    """Numbers with ``digits`` significant digits; other values as text."""
    if isinstance(x, bool) or x is None:
        return "—" if x is None else ("yes" if x else "no")
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x != x:
            return "nan"
        if x in (float("inf"), float("-inf")):
            return "∞" if x > 0 else "-∞"
        return f"{x:.{digits}g}"
    return str(x)


def pm(mean: float, std: float) -> str:
    return f"{mean:.4g} ± {std:.3g}"


def ci(d: dict[str, Any]) -> str:
    lo, hi = d["ci95"]
    return f"{d['mean']:+.4g} [{lo:+.4g}, {hi:+.4g}]"


# -- rendering ------------------------------------------------------------------------------------
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1150px;margin:24px auto;
padding:0 16px;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}.verdict{font-size:1.25em;font-weight:600;padding:10px 14px;
border-radius:6px;margin:.6em 0}.pass{background:#e3f6e5;color:#116b1f;border:1px solid #9bd6a4}
.fail{background:#fde6e6;color:#9b1111;border:1px solid #e8a0a0}
.inconclusive{background:#fff4d6;color:#7a5200;border:1px solid #e6c36a}.muted{color:#666;font-size:.9em}
"""


def render_html(title: str, subtitle: str, sections: list[Section]) -> str:
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1><p class='muted'>{html.escape(subtitle)}</p>"]
    for s in sections:
        out.append(f"<h2>{html.escape(s.title)}</h2>")
        for kind, value in s.blocks:
            if kind == "p":
                out.append(f"<p>{html.escape(value)}</p>")
            elif kind == "verdict":
                status, text = value
                css = {"PASS": "pass", "INCONCLUSIVE": "inconclusive"}.get(status, "fail")
                out.append(f"<div class='verdict {css}'>{html.escape(text)}</div>")
            elif kind == "table":
                headers, rows = value
                out.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in headers) + "</tr>")
                for row in rows:
                    out.append("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>")
                out.append("</table>")
            elif kind == "img":
                key, png, alt = value
                b64 = base64.b64encode(png).decode("ascii")
                out.append(f"<img alt='{html.escape(alt)}' title='{html.escape(key)}' "
                           f"src='data:image/png;base64,{b64}'>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(x: Any) -> str:
    return fmt(x).replace("|", "\\|")


def render_markdown(title: str, subtitle: str, sections: list[Section], image_dir: str = REPORT_DIR) -> str:
    out = [f"# {title}", "", f"_{subtitle}_", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for kind, value in s.blocks:
            if kind == "p":
                out += [value, ""]
            elif kind == "verdict":
                status, text = value
                out += [f"**{ {'PASS': '✅', 'INCONCLUSIVE': '⚠️'}.get(status, '❌') } {text}**", ""]
            elif kind == "table":
                headers, rows = value
                out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
                out.append("|" + "|".join("---" for _ in headers) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                out.append("")
            elif kind == "img":
                key, _, alt = value
                out += [f"![{alt}]({image_dir}/{key}.png)", ""]
    return "\n".join(out)


def write_report(directory: str | Path, title: str, subtitle: str, sections: list[Section], *,
                 html_name: str = REPORT_HTML, md_name: str = REPORT_MD, image_dir: str = REPORT_DIR) -> list[Path]:
    """Write ``html_name``, ``md_name`` and ``image_dir/*.png`` into ``directory``, each atomically.

    Returns the paths written. Files are first written to a temporary directory beside them and
    then renamed into place, so a failure leaves the previous report (or none), never half of one.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report.tmp-", dir=root))
    try:
        (tmp / html_name).write_text(render_html(title, subtitle, sections), encoding="utf-8")
        (tmp / md_name).write_text(render_markdown(title, subtitle, sections, image_dir), encoding="utf-8")
        (tmp / image_dir).mkdir()
        for s in sections:
            for kind, value in s.blocks:
                if kind == "img":
                    key, png, _ = value
                    (tmp / image_dir / f"{key}.png").write_bytes(png)
        old = root / image_dir
        if old.exists():
            shutil.rmtree(old)
        os.replace(tmp / image_dir, old)
        os.replace(tmp / md_name, root / md_name)
        os.replace(tmp / html_name, root / html_name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [root / html_name, root / md_name, root / image_dir]


# -- the validation report ------------------------------------------------------------------------
def _maybe(fn: Callable[[], bytes]) -> bytes | None:
    try:
        return fn()
    except (KeyError, ValueError, IndexError, TypeError):
        return None


def _pct(rate: float | None, episodes: Mapping[str, Any] | None = None) -> str:
    """A failure / success rate as a percentage, with the count when the episodes are known."""
    if rate is None:
        return "—"
    n = len((episodes or {}).get("returns", []))
    return f"{100 * rate:.0f}%" + (f" ({round(rate * n)}/{n})" if n else "")


def saturation_section(targets: dict[str, Any]) -> Section | None:
    """Saturation of every INT8 tensor on the validation rollouts, and results under disturbances."""
    rows, pert_rows, warnings = [], [], []
    for t, r in targets.items():
        for cond, res in (("nominal", r), ("perturbed", r.get("perturbed"))):
            sat = (res or {}).get("saturation")
            if not sat:
                continue
            for traj in ("on_int8_trajectory", "on_float_trajectory"):
                for name, st in sorted((sat.get(traj) or {}).get("tensors", {}).items()):
                    rows.append([t, cond, traj.removeprefix("on_").replace("_", " "), name, f"{st['rate']:.3%}"])
            warnings += [f"{t} {cond}: {w}" for w in sat.get("warnings", [])]
        pert = r.get("perturbed")
        if pert:
            d = pert["paired_difference"]
            pert_rows.append([t, ", ".join(str(p) for p in pert.get("perturbation", [])),
                              pm(pert["float"]["mean"], pert["float"]["std"]),
                              pm(pert["int8"]["mean"], pert["int8"]["std"]), ci(d),
                              f"{pert['float'].get('termination_rate', 0):.0%} / "
                              f"{pert['int8'].get('termination_rate', 0):.0%}"])
    if not rows and not pert_rows:
        return None
    sec = Section("Saturation and robustness")
    sec.p("Fraction of each INT8 tensor's values outside its calibrated range on the validation rollouts "
          "(values there are clipped). A high rate under disturbances means calibration did not cover the "
          "states recovery needs: calibrate under disturbances (--calib-perturb).")
    if rows:
        sec.table(["target", "condition", "trajectory", "tensor", "saturation"], rows)
    for w in warnings:
        sec.p("Warning: " + w)
    if pert_rows:
        sec.table(["target", "disturbance", "float return", "int8 return", "int8 − float [95% CI]",
                   "terminated float / int8"], pert_rows)
    return sec


def _verdict_interval(r: Mapping[str, Any]) -> list[float]:
    """The interval the verdict used (unbounded ends drawn at the bootstrap CI's), else the bootstrap CI."""
    boot = r["paired_difference"]["ci95"]
    iv = (r.get("verdict", {}).get("returns") or {}).get("interval")
    if not iv:
        return list(boot)
    return [boot[0] if iv[0] is None else iv[0], boot[1] if iv[1] is None else iv[1]]


def _verdict_label(r: Mapping[str, Any]) -> str:
    ret = r.get("verdict", {}).get("returns") or {}
    method = str(ret.get("method", ""))
    if not method:
        return "95% CI of mean (bootstrap)"
    return "95% confidence sequence (verdict)" if "sequence" in method else "95% t-interval (verdict)"


def _verdict_section(val: ValidationResult, manifest: Mapping[str, Any] | None) -> Section | None:
    """The verdict per target, how it was reached, and the summary table."""
    targets = val["targets"]
    tol = val.get("tolerance", {})
    v = val.get("verdict", {})
    head = Section("Verdict")
    n = len(val["seeds"])
    head.verdict(str(v.get("status", "?")), f"{v.get('status', '?')}: int8 vs float on {n} paired episodes "
                                            f"({', '.join(targets)})")
    from edgeq.validate.verdict import Tolerance

    head.p("Tolerance: " + Tolerance.from_json(tol).describe() + ". PASS needs the whole interval inside the band "
           "and the failure comparison within its tolerance; FAIL needs an interval wholly beyond; anything else is "
           "INCONCLUSIVE (exit code 3), which is not a pass.")
    from edgeq.describe import file_headline, result_rows, return_ratio_text

    for t, r in result_rows(val):
        vd = r.get("verdict", {})
        files = f"{t} ({r.get('runtime', '?')}: {r.get('float_model', '?')} vs {r.get('int8_model', '?')})"
        hl = file_headline(manifest or {}, str(r.get("int8_model")))
        head.p(f"{files}: {vd.get('status', '?')} — " + "; ".join(vd.get("reasons", [])) + f". {return_ratio_text(r)}"
               + (f"; {hl}" if hl else "") + ".")
        eps = r.get("episodes") or {}
        if eps and t in targets:
            design = eps.get("design", {})
            head.p(f"{t}: {eps.get('episodes')} paired episodes ({eps.get('stop_reason')}); returns judged by the "
                   f"{design.get('returns_procedure', '?')}, failures by the {design.get('failures_procedure', '?')}."
                   + (f" About {vd['needed_episodes']} episodes would decide." if vd.get("needed_episodes") else ""))
        if vd.get("floor_text"):
            head.p(f"{t}: {vd['floor_text']}.")
        for note in [*r.get("notes", []), *r.get("latency_notes", [])]:
            head.p(f"Note: {note}.")
    for t, reason in val.get("unavailable_targets", {}).items():
        head.p(f"{t}: not validated — unavailable here ({reason}).")
    rows = []
    for t, r in result_rows(val):
        d = r["paired_difference"]
        fl = r.get("noise_floor")
        ae = r["action_error"]["on_float_trajectory"]
        vd = r.get("verdict", {})
        ret = vd.get("returns", {})
        iv = ret.get("interval", d["ci95"])
        band = ret.get("band")
        oc = r.get("outcomes") or {}

        def counts(side: str, oc: dict[str, Any] = oc) -> str:
            o = oc.get(side)
            return f"{o['success']} / {o['failure']} / {o['timeout']}" if o else "—"

        rows.append([t, f"{r.get('float_model', '?')} / {r.get('int8_model', '?')}", len(r["float"]["returns"]),
                     pm(r["float"]["mean"], r["float"]["std"]), pm(r["int8"]["mean"], r["int8"]["std"]),
                     f"{d['mean']:+.4g} [{fmt(iv[0])}, {fmt(iv[1])}]",
                     f"[{fmt(band[0])}, {'+∞' if band[1] is None else fmt(band[1])}]" if band else "—",
                     f"{d['relative_mean']:+.3%}",
                     counts("float"), counts("int8"),
                     f"[{fl['band'][0]:+.3g}, {fl['band'][1]:+.3g}]" if fl else "—",
                     (fl["distinguishable"] if fl else None), f"{ae['mean_abs']:.3g} / {ae['max_abs']:.3g}",
                     vd.get("status", "—")])
    head.table(["target", "files: float / int8", "episodes", "float return", "int8 return",
                "int8 − float [verdict interval]", "band", "relative", "float success / failure / time-out",
                "int8 success / failure / time-out", "noise floor (draw means)", "int8 ≠ floor",
                "action err mean / max", "verdict"], rows)
    head.p("Columns: files = the float and int8 files that produced the row (each target runs its own int8 file: "
           "cpu → policy.int8.cpu.onnx, cuda → policy.int8.cuda.onnx, trt → policy.int8.onnx); episodes = paired "
           "episodes (same seeds); float / int8 return = mean ± std of the episode return; int8 − float = mean "
           "paired difference and the interval the verdict uses; band = the tolerance band; relative = the "
           "difference over |float mean|; success / failure / time-out = episodes that succeeded, failed (e.g. "
           "fell: terminated early) or ran to the time limit; noise floor = range of the mean difference of the "
           "float policy re-run with 1e-6 action noise (what rounding alone moves); int8 ≠ floor = whether int8's "
           "difference is distinguishable from that floor; action err = |int8 − float| action on the float "
           "policy's states, mean / max, in action units; verdict = PASS / FAIL / INCONCLUSIVE.")
    return head


def _saturation_section(val: ValidationResult, manifest: Mapping[str, Any] | None) -> Section | None:
    """Saturation of the INT8 tensors (when measured)."""
    targets = val["targets"]
    return saturation_section(targets)


def _returns_section(val: ValidationResult, manifest: Mapping[str, Any] | None) -> Section | None:
    """Episode returns and early terminations per target."""
    targets = val["targets"]
    s = Section("Returns")
    groups = []
    for t, r in targets.items():
        groups += [(f"{t} float", r["float"]["returns"]), (f"{t} int8", r["int8"]["returns"])]
    colors = [plots.FLOAT_COLOR, plots.INT8_COLOR] * len(targets)
    png = _maybe(lambda: plots.returns_plot(groups, "episode returns, same seeds", colors))
    if png:
        s.img("returns", png, "episode returns float vs int8 per target")
    term_rows = [[t, _pct(r["termination"]["float_rate"], r["float"]), _pct(r["termination"]["int8_rate"], r["int8"]),
                  r["termination"]["float_mean_length"], r["termination"]["int8_mean_length"],
                  ", ".join(map(str, r["termination"]["only_int8_terminated"])) or "—",
                  _pct(r["termination"].get("float_success_rate")), _pct(r["termination"].get("int8_success_rate"))]
                 for t, r in targets.items() if "termination" in r]
    if term_rows:
        s.p("Early termination (falls, for tasks that end episodes early) on the same seeds, and the success rate "
            "where the env reports one (info['is_success']):")
        s.table(["target", "float terminated", "int8 terminated", "float mean length", "int8 mean length",
                 "seeds only int8 terminated", "float success", "int8 success"], term_rows)
    return s


def _paired_section(val: ValidationResult, manifest: Mapping[str, Any] | None) -> Section | None:
    """Per-seed paired differences against the float noise floor."""
    targets = val["targets"]
    s = Section("Paired differences and the noise floor")
    s.p("Each bar is one seed's int8 − float return. Grey crosses: the float policy re-rolled on the same seed with "
        "Gaussian action noise of 1e-6 × action half-range (float32 rounding level), one cross per independent draw. "
        "Closed-loop returns of chaotic tasks move under any perturbation; int8 should be judged against that floor.")
    panels = []
    for t, r in targets.items():
        fl = r.get("noise_floor")
        floor = None
        if fl:
            f = r["float"]["returns"]
            floor = [[x - y for x, y in zip(row, f[:len(row)], strict=True)] for row in fl["returns"]]
        panels.append({"title": t, "seeds": r["float"]["seeds"], "diff": r["paired_difference"]["per_episode"],
                       "ci": _verdict_interval(r), "ci_label": _verdict_label(r), "floor": floor,
                       "band": (r.get("verdict", {}).get("returns") or {}).get("band")})
    png = _maybe(lambda: plots.paired_plot(panels))
    if png:
        s.img("paired", png, "paired differences per seed")
    frows = []
    for t, r in targets.items():
        fl = r.get("noise_floor")
        if fl:
            vs = fl["int8_minus_floor"]
            frows.append([t, fl["draws"], fl["mean_difference"], fl["std_of_draw_means"], fl["per_episode_rms"],
                          fl["int8_per_episode_rms"], fl["spread_ratio"],
                          f"{vs['mean']:+.4g} [{vs['ci95'][0]:+.4g}, {vs['ci95'][1]:+.4g}]", fl["distinguishable"]])
    if frows:
        s.table(["target", "draws", "floor mean diff", "std of draw means", "floor per-episode RMS",
                 "int8 per-episode RMS", "int8 / floor spread", "int8 − floor [95% CI]", "distinguishable"], frows)
    return s


def _sensitivity_section(val: ValidationResult, manifest: Mapping[str, Any] | None) -> Section | None:
    """The float return under injected action noise: the error budget."""
    targets = val["targets"]
    sens = val.get("sensitivity")
    if sens:
        s = Section("Sensitivity: the error budget")
        first = next(iter(targets.values()))
        png = _maybe(lambda: plots.sensitivity_plot(sens, first.get("noise_floor"), sens.get("int8_mean")))
        if png:
            s.img("sensitivity", png, "return vs injected action noise")
        budget = sens.get("budget_sigma")
        s.p(f"The float policy's mean return under Gaussian action noise of increasing size ({sens['noise']}), "
            f"{sens['levels'][0]['draws']} draws per level, on the validation seeds. "
            + (f"The return drops by more than the tolerance ({sens['tolerance']:.1%}) from about {budget:.3g} × "
               "half-range: that is the policy's error budget. " if budget else
               "No tested level dropped the return by more than the tolerance. ")
            + (f"int8's measured action error (RMS) is {sens['int8_normalized_rms']:.3g} × half-range"
               + (f", {sens['int8_fraction_of_budget']:.2g}x the budget." if "int8_fraction_of_budget" in sens
                  else ".") if sens.get("int8_normalized_rms") is not None else "")
            + " Injected noise is independent per step while quantization error depends on the state, so this is a "
              "guide to scale, not an exact model.")
        s.table(["noise σ / half-range", "mean return", "std of draw means", "mean paired diff", "relative drop"],
                [[r["sigma"], r["mean"], r["std_of_draw_means"], r["mean_difference"], f"{r['relative_drop']:+.3%}"]
                 for r in sens["levels"]])
        return s
    return None


def _action_error_section(val: ValidationResult, manifest: Mapping[str, Any] | None) -> Section | None:
    """INT8 vs float action error on the same states."""
    targets = val["targets"]
    s = Section("Action error")
    first_t, first = next(iter(targets.items()))
    ae = first["action_error"]["on_float_trajectory"]
    if "action_error_series" in first and ae.get("steps"):
        png = _maybe(lambda: plots.action_error_plot(first["action_error_series"], ae))
        if png:
            s.img("action_error", png, "action error along an episode and per dimension")
    s.p("|a_int8 − a_float| per step, with the int8 policy shadowing the float one on the float policy's own "
        "trajectory (and vice versa), so both see exactly the same observations.")
    arows = []
    for t, r in targets.items():
        for where, e in r["action_error"].items():
            if e.get("steps"):
                arows.append([t, where.replace("on_", "").replace("_", " "), e["steps"], e["mean_abs"],
                              e.get("rms"), e["p99_step_max_abs"], e["max_abs"], e.get("normalized_rms")])
    s.table(["target", "states", "steps", "mean |Δa|", "RMS", "p99 (max over dims)", "max", "RMS / half-range"],
            arows)
    if ae.get("per_dim_mean_abs"):
        s.p(f"Per action dimension ({first_t}, float trajectory):")
        nd = len(ae["per_dim_mean_abs"])
        cols = zip(ae["per_dim_mean_abs"], ae.get("per_dim_rms", [None] * nd), ae.get("per_dim_p99_abs", [None] * nd),
                   ae["per_dim_max_abs"], strict=True)
        s.table(["dim", "mean", "RMS", "p99", "max"],
                [[f"a[{i}]", m, r_, p, mx] for i, (m, r_, p, mx) in enumerate(cols)])
    return s


def _divergence_section(val: ValidationResult, manifest: Mapping[str, Any] | None) -> Section | None:
    """How far the INT8 and float trajectories of a seed drift apart."""
    targets = val["targets"]
    divs = [(t, r["divergence"]) for t, r in targets.items() if r.get("divergence", {}).get("steps")]
    if divs:
        s = Section("Trajectory divergence")
        png = _maybe(lambda: plots.divergence_plot(divs))
        if png:
            s.img("divergence", png, "observation distance between int8 and float trajectories")
        s.p("Distance between the int8 and float trajectories of the same seed: RMS over observation dimensions of the "
            "difference divided by each dimension's std along the float trajectories.")
        rows = []
        for t, dv in divs:
            fs = dv["first_step_above"]
            hits1 = [x for x in fs["1"] if x is not None]
            rows.append([t, dv["episodes"], dv["median"][min(10, len(dv["median"]) - 1)],
                         dv["median"][min(100, len(dv["median"]) - 1)], dv["final_median"],
                         f"{sum(x is not None for x in fs['0.1'])}/{dv['episodes']}",
                         f"{len(hits1)}/{dv['episodes']}" + (f" (median step {sorted(hits1)[len(hits1) // 2]})"
                                                             if hits1 else "")])
        s.table(["target", "episodes", "median at step 10", "median at step 100", "median at last step",
                 "episodes > 0.1", "episodes > 1"], rows)
        return s
    return None


def _per_layer_section(val: ValidationResult, manifest: Mapping[str, Any] | None) -> Section | None:
    """Per-layer SQNR and the one-layer-at-a-time ranking."""
    pl = val.get("per_layer")
    if pl:
        s = Section("Per-layer error")
        png = _maybe(lambda: plots.per_layer_plot(pl))
        if png:
            s.img("per_layer", png, "per-layer SQNR and share of action error")
        s.p(f"On {pl['states']} states the float policy visited. Left/first table: error at each fused layer output "
            "(GEMM + bias + activation) of the full int8 model policy.int8.onnx (the QDQ file TensorRT and CUDA "
            "run; the CPU file's float layers are listed under Quantized layers), accumulated through the layers "
            "before it.")
        s.table(["layer", "role", "fused", "precision in policy.int8.onnx", "SQNR (dB)", "relative error",
                 "max |error|"],
                [[r["node"], r.get("role", "layer"), r["fused"], r["precision"], r.get("sqnr_db"),
                  r.get("relative_error"), r.get("max_abs_error")] for r in pl["layers"]])
        if pl.get("ranking_by_block"):
            s.p("By block (attention blocks and MLPs: the shares of their projections and of the attention "
                "products Q·Kᵀ and A·V, each quantized alone, added up):")
            s.table(["block", "share", "action MSE", "units"],
                    [[b["block"], f"{b['share']:.1%}", b["action_mse"], ", ".join(b["units"])]
                     for b in pl["ranking_by_block"]])
        if pl.get("ranking"):
            s.p("Ranking: each layer quantized alone (all others float); its action error and share of the sum. "
                + (f"Sum of single-layer MSEs / full-model MSE = {pl['sum_single_layer_mse_over_full_mse']:.3g} "
                   "(near 1: errors add up independently)." if pl.get("sum_single_layer_mse_over_full_mse") else ""))
            s.table(["layer", "role", "share", "action RMS error", "action max |error|", "own output SQNR (dB)"],
                    [[r["node"], r.get("role", "layer"), f"{r['share']:.1%}", r["action_rms_error"],
                      r["action_max_abs_error"], r.get("own_output_sqnr_db")] for r in pl["ranking"]])
        return s
    return None


def _latency_section(val: ValidationResult, manifest: Mapping[str, Any] | None) -> Section | None:
    """Batch-1 and large-batch latency per model and target, and file sizes."""
    targets = val["targets"]
    lats = [(t, r["latency"]) for t, r in targets.items() if r.get("latency")]
    if lats:
        s = Section("Latency")
        png = _maybe(lambda: plots.latency_plot([(f"{t}", lat) for t, lat in lats]))
        if png:
            s.img("latency", png, "batch-1 latency histograms")
        rows = []
        for t, lat in lats:
            model_files = {"float": targets[t].get("float_model"), "int8": targets[t].get("int8_model")}
            for name, m in lat["models"].items():
                b = m["batch1"]
                lb = m.get("large_batch", {})
                label = f"{name} ({model_files[name]})" if model_files.get(name) else name
                rows.append([t, label, b["calls"], b["median_us"], b["p99_us"], b["p999_us"], b["max_us"],
                             lb.get("batch"), lb.get("median_us_per_call"), lb.get("samples_per_s")])
        s.p("Batch 1: every call timed after a warm-up, float and int8 in alternating blocks, one intra-op thread "
            "(what edgeq.deploy runs). Large batch: median time per call.")
        s.table(["target", "model (file)", "calls", "median (us)", "p99 (us)", "p99.9 (us)", "max (us)",
                 "large batch", "us / call", "samples / s"], rows)
        for t in targets:
            for note in targets[t].get("latency_notes", []):
                s.p("Note: " + note + ".")
        sizes = val.get("sizes", {})
        if sizes:
            s.table(["file", "size (bytes)"], [[k, v] for k, v in sizes.items()])
        return s
    return None


def _layers_section(val: ValidationResult, manifest: Mapping[str, Any] | None) -> Section | None:
    """What each layer runs as in each file (from the manifest)."""
    if manifest and manifest.get("quantization", {}).get("layers"):
        return layers_section(manifest)
    return None


def _settings_section(val: ValidationResult, manifest: Mapping[str, Any] | None) -> Section | None:
    """The environment, seeds, versions and validation options."""
    n = len(val["seeds"])
    s = Section("Settings")
    rows: list[list[Any]] = [["environment", val["env_id"]],
                             ["seeds", f"{val['seeds'][0]} … {val['seeds'][-1]} ({n} episodes)"]]
    if manifest:
        from edgeq.describe import loaded_lines

        for line in loaded_lines(manifest):
            key, _, value = line.partition(": ")
            rows.append([key, value])
        src = manifest.get("source", {})
        rows.append(["source file", f"{src.get('path')}"])
        q = manifest.get("quantization", {}).get("settings", {})
        if q:
            rows.append(["activations", "per-tensor int8, quantizer chosen per layer (see Quantized layers)"
                         if q.get("options", {}).get("auto") else
                         f"{q.get('activation_calibrator')} {q.get('calibrator_params')}, "
                         f"{q.get('activation_granularity')}"])
            rows.append(["weights", f"int8 {q.get('weight_granularity')} (method per layer: see Quantized layers)"])
        env_rec = manifest.get("environment") or {}
        for name, version in env_rec.get("versions", {}).items():
            rows.append([f"version: {name}", version])
        for key in ("python", "machine", "date_utc"):
            if env_rec.get(key):
                rows.append([key.replace("_utc", " (UTC)"), env_rec[key]])
        if val.get("made_utc"):
            rows.append(["date (UTC)", val["made_utc"]])
        if not env_rec:
            rows.append(["edgeq version", manifest.get("edgeq_version", "?")])
    opts = val.get("options", {})
    for k in ("floor_draws", "sensitivity_draws", "latency_calls", "num_envs", "detail_episodes"):
        if k in opts:
            rows.append([k, opts[k]])
    design = opts.get("design") or {}
    if design:
        rows.append(["episodes", f"{design.get('mode')}: min {design.get('min_episodes')}, batches of "
                                 f"{design.get('batch_episodes')}, at most {design.get('max_episodes')}"
                                 + (f" or {design['time_budget_s']:g} s" if design.get("time_budget_s") else "")
                     if design.get("mode") == "auto" else "fixed (the seeds given, one look)"])
    if opts.get("failure"):
        rows.append(["failure rule", f"{opts['failure'].get('rule')}: {opts['failure'].get('meaning')}"])
    for k, t in {**val.get("timings", {}), **val.get("validation_timings", {})}.items():
        rows.append([k, f"{t:.2f}"])
    s.table(["setting", "value"], rows)
    return s


#: The sections of a validation report, in order; each returns None when it has nothing to show.
VALIDATION_SECTIONS: tuple[Callable[[ValidationResult, Mapping[str, Any] | None], Section | None], ...] = (
    _verdict_section, _saturation_section, _returns_section, _paired_section, _sensitivity_section,
    _action_error_section, _divergence_section, _per_layer_section, _latency_section, _layers_section,
    _settings_section)


def validation_sections(val: ValidationResult, manifest: Mapping[str, Any] | None = None) -> list[Section]:
    """The sections of a bundle's validation report (verdict first, then each measurement)."""
    return [s for s in (section(val, manifest) for section in VALIDATION_SECTIONS) if s is not None]


def layers_section(manifest: Mapping[str, Any]) -> Section:
    """What each layer really runs as in each file, and the quantizers the per-layer search chose."""
    from edgeq.describe import cpu_float_text, file_headlines, layer_precisions, precision_counts, pruning_text

    s = Section("Quantized layers")
    heads = file_headlines(manifest)  # counted from each shipped file's graph
    for line in heads or [precision_counts(manifest)]:
        s.p(line + ".")
    pruned = pruning_text(manifest)
    if pruned:
        s.p(pruned + ".")
    text = cpu_float_text(manifest)
    if text:
        s.p(text + ".")
    by_node = {la["node"]: la for la in manifest["quantization"]["layers"]}
    rows = []
    for r in layer_precisions(manifest):
        la = by_node[r["node"]]
        weights = (f"{la.get('weight_method', '')} {la.get('rounding', '')}".strip()
                   if la["precision"] == "int8" else "—")
        kernel = f"{la['kernel']:.3f} ({la['kernel_per_tensor']:.3f})" if "kernel" in la else "—"
        rows.append([r["node"], r["tensorrt"], r["cpu"], r["choice"] or "—", weights,
                     "yes" if la.get("bias_corrected") else "no", kernel])
    s.table(["layer", "policy.int8.onnx (TensorRT, CUDA)", "policy.int8.cpu.onnx", "input quantizer (chosen)",
             "weights (per channel)", "bias corrected", "kernel (per-tensor)"], rows)
    s.p("Columns: the two precision columns say what the layer runs as in each file (float (int8 weights): weights "
        "stored as int8 and dequantized, arithmetic in float); input quantizer = the activation calibrator and input "
        "rewrite the per-layer search chose on held-out states (not the recipe's starting point); weights = "
        "per-channel weight quantizer and rounding; bias corrected = empirical bias correction applied; kernel = "
        "fraction of the layer's int8 inputs that round to zero with the chosen quantizer (in brackets: with a plain "
        "per-tensor quantizer).")
    metrics = manifest["quantization"].get("metrics", {})
    stages = metrics.get("heldout_score_by_stage")
    if stages:
        s.p("Held-out score after each step of the search (mean + tail weight × mean of the worst 1% of action "
            "errors, as a fraction of the action half-range; a step is kept only if it lowers the score): "
            + ", ".join(f"{k} {v:.4f}" for k, v in stages.items()) + ".")
    return s


def write_validation_report(directory: str | Path, val: ValidationResult,
                            manifest: Mapping[str, Any] | None = None) -> list[Path]:
    """Write report.html, report.md and report/*.png for a bundle's validation into ``directory``."""
    algo = (manifest or {}).get("source", {}).get("algorithm") or "policy"
    from edgeq._version import __version__

    title = f"edgeq validation: {algo} on {val['env_id']}"
    subtitle = (f"edgeq {__version__} · {len(val['seeds'])} paired episodes · targets: "
                f"{', '.join(val['targets'])}")
    return write_report(directory, title, subtitle, validation_sections(val, manifest))


# -- the comparison report ------------------------------------------------------------------------
def compare_sections(cmp: dict[str, Any]) -> list[Section]:
    """Sections of ``edgeq compare``'s report: one table, then the plots, all candidates together."""
    cands = cmp["candidates"]
    lat = cmp.get("latency", {}).get("models", {})
    sections: list[Section] = []
    s = Section("Summary")
    from edgeq.validate.verdict import Tolerance

    ref = cmp["reference"]
    s.p(f"Reference: {ref['name']} (float, {ref.get('file', ref['model'])}). "
        f"Tolerance: {Tolerance.from_json(cmp['tolerance']).describe()}. Target: {cmp['target']}. "
        f"All rows use the same {len(cmp['seeds'])} seeds; files: "
        + ", ".join(f"{n}: {r.get('file', r.get('model'))}" for n, r in cands.items()) + ".")
    for w in cmp.get("warnings", []):
        s.p("Warning: " + w)
    f = cmp["float"]
    rows: list[list[Any]] = [["float (reference)", pm(f["mean"], f["std"]), "—", "—", "—", "—",
                              _pct(f["termination_rate"], f), f.get("size"),
                              lat.get("float", {}).get("batch1", {}).get("median_us"),
                              lat.get("float", {}).get("batch1", {}).get("p999_us"), "—"]]
    for name, r in cands.items():
        d = r["paired_difference"]
        ae = r["action_error"]["on_float_trajectory"]
        fl = r.get("noise_floor")
        lm = lat.get(name, {}).get("batch1", {})
        rows.append([name, pm(r["int8"]["mean"], r["int8"]["std"]), ci(d), f"{d['relative_mean']:+.3%}",
                     fl["distinguishable"] if fl else None,
                     f"{ae['mean_abs']:.3g} / {ae['p99_step_max_abs']:.3g} / {ae['max_abs']:.3g}",
                     _pct(r["int8"]["termination_rate"], r["int8"]), r.get("size"), lm.get("median_us"),
                     lm.get("p999_us"),
                     r["verdict"]["status"]])
    s.table(["model", "return", "− float [95% CI]", "relative", "≠ noise floor", "action err mean / p99 / max",
             "terminated", "size (bytes)", "batch-1 median (us)", "p99.9 (us)", "verdict"], rows)
    sections.append(s)

    s = Section("Returns and paired differences")
    groups = [("float", f["returns"])] + [(name, r["int8"]["returns"]) for name, r in cands.items()]
    colors = [plots.FLOAT_COLOR] + [plots.PALETTE[i % len(plots.PALETTE)] for i in range(len(cands))]
    png = _maybe(lambda: plots.returns_plot(groups, "episode returns, same seeds", colors))
    if png:
        s.img("returns", png, "returns per model")
    panels = []
    for name, r in cands.items():
        fl = r.get("noise_floor")
        floor = [[x - y for x, y in zip(row, f["returns"], strict=True)] for row in fl["returns"]] if fl else None
        panels.append({"title": name, "seeds": cmp["seeds"], "diff": r["paired_difference"]["per_episode"],
                       "ci": _verdict_interval(r), "ci_label": _verdict_label(r), "floor": floor,
                       "band": (r.get("verdict", {}).get("returns") or {}).get("band")})
    png = _maybe(lambda: plots.paired_plot(panels))
    if png:
        s.img("paired", png, "paired differences per candidate")
    sections.append(s)

    s = Section("Action error and divergence")
    png = _maybe(lambda: plots.action_error_compare_plot({n: r["action_error_series"] for n, r in cands.items()
                                                          if "action_error_series" in r}))
    if png:
        s.img("action_error", png, "action error along the float episode")
    divs = [(n, r["divergence"]) for n, r in cands.items() if r.get("divergence", {}).get("steps")]
    png = _maybe(lambda: plots.divergence_plot(divs)) if divs else None
    if png:
        s.img("divergence", png, "trajectory divergence")
    sections.append(s)

    pls = {n: r["per_layer"] for n, r in cands.items() if r.get("per_layer")}
    if pls:
        s = Section("Per-layer error")
        png = _maybe(lambda: plots.per_layer_compare_plot(pls))
        if png:
            s.img("per_layer", png, "per-layer SQNR per candidate")
        nodes: list[str] = []
        for pl in pls.values():
            nodes += [r["node"] for r in pl["layers"] if r["node"] not in nodes]
        table_rows = []
        for node in nodes:
            row: list[Any] = [node]
            for pl in pls.values():
                match: dict[str, Any] = next((x for x in pl["layers"] if x["node"] == node), {})
                row.append(match.get("sqnr_db"))
            table_rows.append(row)
        s.table(["layer"] + [f"{n} SQNR (dB)" for n in pls], table_rows)
        for n, pl in pls.items():
            if pl.get("ranking"):
                s.p(f"{n}: share of action error, one layer int8 at a time: "
                    + ", ".join(f"{r['node']} {r['share']:.1%}" for r in pl["ranking"]) + ".")
        sections.append(s)
    if cmp.get("latency"):
        s = Section("Latency")
        png = _maybe(lambda: plots.latency_plot([(cmp["target"], cmp["latency"])]))
        if png:
            s.img("latency", png, "batch-1 latency per model")
        s.table(["model", "calls", "median (us)", "p99 (us)", "p99.9 (us)", "large batch", "us / call"],
                [[n, m["batch1"]["calls"], m["batch1"]["median_us"], m["batch1"]["p99_us"], m["batch1"]["p999_us"],
                  m.get("large_batch", {}).get("batch"), m.get("large_batch", {}).get("median_us_per_call")]
                 for n, m in lat.items()])
        sections.append(s)
    return sections


def write_compare_report(directory: str | Path, cmp: dict[str, Any]) -> list[Path]:
    """Write compare.html, compare.md and compare/*.png into ``directory``."""
    from edgeq._version import __version__

    title = f"edgeq compare on {cmp['env_id']}: {', '.join(cmp['candidates'])}"
    subtitle = f"edgeq {__version__} · {len(cmp['seeds'])} paired episodes · target {cmp['target']}"
    return write_report(directory, title, subtitle, compare_sections(cmp), html_name="compare.html",
                        md_name="compare.md", image_dir="compare")
