"""``edgeq validate``: closed-loop float vs int8 verdict of a bundle, with exit code 0 PASS / 1 FAIL / 2 error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeq.commands._app import (
    ExecutorOption,
    RayAddressOption,
    WorkersOption,
    app,
    console,
    err_console,
    executor_config,
    print_summary,
    progress_factory,
    run_guarded,
)
from edgeq.errors import EdgeqError


def parse_seeds(text: str | None, episodes: int, seed: int) -> list[int]:
    """``--seeds "0-9,20,31"`` (ranges inclusive) or, without it, ``seed .. seed+episodes-1``."""
    if not text:
        if episodes < 1:
            raise EdgeqError(f"--episodes must be >= 1, got {episodes}")
        return list(range(seed, seed + episodes))
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise EdgeqError(f"--seeds {text!r}: {part!r} is not an integer or a range such as 0-9") from None
    if not out:
        raise EdgeqError(f"--seeds {text!r} names no seeds; expected e.g. '0-9' or '3,5,8'")
    if len(set(out)) != len(out):
        raise EdgeqError(f"--seeds {text!r} repeats a seed; each paired episode needs its own seed")
    return out


def print_details(validation: dict[str, Any]) -> None:
    """Latency, per-layer ranking and sensitivity tables after the verdict table."""
    lat_rows = [(t, name, m) for t, r in validation["targets"].items() if r.get("latency")
                for name, m in r["latency"]["models"].items()]
    if lat_rows:
        table = Table(title="latency (batch 1, one thread)")
        for col in ("target", "model", "calls", "median us", "p99 us", "p99.9 us", "large batch us/call"):
            table.add_column(col, justify="right")
        for t, name, m in lat_rows:
            b, lb = m["batch1"], m.get("large_batch", {})
            table.add_row(t, name, str(b["calls"]), f"{b['median_us']:.1f}", f"{b['p99_us']:.1f}",
                          f"{b['p999_us']:.1f}",
                          f"{lb['median_us_per_call']:.0f} (b={lb['batch']})" if lb else "-")
        console.print(table)
    pl = validation.get("per_layer")
    if pl:
        table = Table(title=f"per-layer error on {pl['states']} visited states")
        for col in ("layer", "fused", "SQNR dB", "rel. error", "share of action error (alone)"):
            table.add_column(col, justify="right")
        share = {r["node"]: r["share"] for r in (pl.get("ranking") or [])}
        for r in pl["layers"]:
            sq, rel = r.get("sqnr_db"), r.get("relative_error")
            table.add_row(r["node"], r["fused"], "-" if "sqnr_db" not in r else "∞" if sq is None else f"{sq:.1f}",
                          "-" if rel is None else f"{rel:.4f}",
                          f"{share[r['node']]:.1%}" if r["node"] in share else "-")
        console.print(table)
    sens = validation.get("sensitivity")
    if sens:
        budget = sens.get("budget_sigma")
        text = (f"sensitivity: return drops past the tolerance at action noise ≈ {budget:.3g} x half-range"
                if budget else "sensitivity: no tested noise level dropped the return past the tolerance")
        if sens.get("int8_normalized_rms") is not None:
            text += f"; int8 action RMS error = {sens['int8_normalized_rms']:.3g} x half-range"
        console.print(text, highlight=False)


VALIDATE_HELP = (
    "Roll a bundle's float and int8 policies out on the same seeds on each target; PASS/FAIL is the exit code "
    "(0: PASS on every validated target, 1: FAIL, 2: error such as a bad bundle or no target able to run).\n\n"
    "Measured: paired returns with a bootstrap 95% CI and the verdict; the noise floor (float re-rolled with 1e-6 "
    "action noise, --floor-draws draws); action error and trajectory divergence; the sensitivity curve (float "
    "return under growing action noise, 6 levels x --sensitivity-draws extra rollouts: the most expensive part, "
    "--no-sensitivity skips it); per-layer SQNR and the one-layer-at-a-time ranking (cheap, on visited states); "
    "batch-1 latency over --latency-calls calls per model and target plus one large batch. --quick runs what "
    "'edgeq quantize' runs. Results go to validation.json, report.html and report.md in the bundle (or --out)."
)


@app.command(help=VALIDATE_HELP)
def validate(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory made by 'edgeq quantize'.")],
    episodes: Annotated[int, typer.Option(help="Paired episodes (seeds seed .. seed+episodes-1).")] = 10,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    seeds: Annotated[str | None, typer.Option(help="Explicit seeds, e.g. '0-9,20' (overrides --episodes/--seed).")
                     ] = None,
    targets: Annotated[str, typer.Option(help="Comma-separated targets among cpu,cuda,trt; unavailable ones are "
                                              "reported and skipped.")] = "cpu,cuda,trt",
    rel_tol: Annotated[float, typer.Option(help="PASS if |int8 mean - float mean| <= rel_tol x |float mean|.")
                       ] = 0.01,
    abs_tol: Annotated[float | None, typer.Option(help="Also PASS if |int8 - float| <= this (return units).")
                       ] = None,
    ci_pass: Annotated[bool, typer.Option("--ci-pass/--no-ci-pass",
                                          help="Also PASS when the paired 95% CI contains 0.")] = True,
    one_sided: Annotated[bool, typer.Option(help="Only a lower int8 return counts against it.")] = False,
    floor_draws: Annotated[int, typer.Option(help="Noise-floor draws (float + 1e-6 action noise); 0: off.")] = 5,
    sensitivity: Annotated[bool, typer.Option(help="Float return vs injected action noise (error budget).")
                           ] = True,
    sensitivity_draws: Annotated[int, typer.Option(help="Draws per sensitivity noise level.")] = 3,
    per_layer: Annotated[bool, typer.Option(help="Per-layer SQNR and one-layer-at-a-time ranking.")] = True,
    latency_calls: Annotated[int, typer.Option(help="Batch-1 latency calls per model and target; 0: off.")
                             ] = 10_000,
    large_batch: Annotated[int, typer.Option(help="Rows per call for the large-batch latency.")] = 4096,
    quick: Annotated[bool, typer.Option(help="What 'edgeq quantize' runs: 3 floor draws, no sensitivity, 2,000 "
                                             "latency calls.")] = False,
    num_envs: Annotated[int, typer.Option(help="Environments stepped in parallel (vector env).")] = 8,
    workers: WorkersOption = 1,
    executor: ExecutorOption = "serial",
    ray_address: RayAddressOption = None,
    report: Annotated[bool, typer.Option(help="Write report.html, report.md and report/*.png.")] = True,
    out: Annotated[Path | None, typer.Option(help="Write validation.json and the report here instead of into the "
                                                  "bundle (the bundle is left untouched).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print validation.json instead of the tables.")] = False,
) -> None:
    """Validate a bundle in closed loop (help text: :data:`VALIDATE_HELP`)."""
    from edgeq.validate.targets import parse_targets
    from edgeq.validate.validator import ValidationOptions, save_validation, validate_bundle
    from edgeq.validate.verdict import Tolerance

    def go() -> tuple[dict[str, Any], dict[str, Any]]:
        seed_list = parse_seeds(seeds, episodes, seed)
        tol = Tolerance(relative=rel_tol, absolute=abs_tol, ci_passes=ci_pass, one_sided=one_sided)
        base = ValidationOptions.light() if quick else ValidationOptions(
            floor_draws=floor_draws, sensitivity=sensitivity, sensitivity_draws=sensitivity_draws,
            per_layer=per_layer, latency_calls=latency_calls, latency_large_batch=large_batch)
        from dataclasses import replace

        opts = replace(base, targets=tuple(parse_targets(targets)), tolerance=tol, num_envs=num_envs,
                       executor=executor_config(executor, workers, ray_address))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console, transient=True, disable=json_out or not err_console.is_terminal) as prog:
            val, manifest = validate_bundle(bundle, seeds=seed_list, options=opts, progress=progress_factory(prog))
            prog.add_task("writing report", total=None)
            dest = out if out is not None else bundle
            save_validation(dest, val, manifest, report=report, update_manifest=out is None)
        return val, manifest

    val, manifest = run_guarded(go)
    if json_out:
        console.print_json(json.dumps(val))
    else:
        print_summary(val, manifest)
        print_details(val)
        where = out if out is not None else bundle
        if report:
            console.print(f"report: {where / 'report.html'}", highlight=False)
    raise typer.Exit(int(val["verdict"]["exit_code"]))
