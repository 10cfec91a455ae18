"""``edgeq validate``: closed-loop float vs int8 verdict of a bundle.

Exit code 0 PASS, 1 FAIL, 2 error (bad input, no target can run), 3 INCONCLUSIVE (not enough
evidence either way; never a pass).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edgeq.commands._app import (
    ExecutorOption,
    RayAddressOption,
    WorkersOption,
    app,
    console,
    err_console,
    executor_config,
    print_quiet,
    print_summary,
    run_guarded,
)
from edgeq.commands._progress import progress_reporter
from edgeq.errors import EdgeqError


def parse_episodes(text: str | int) -> int | str:
    """``--episodes``: ``"auto"`` or a positive integer."""
    if isinstance(text, int) or str(text).strip().lower() != "auto":
        try:
            n = int(text)
        except ValueError:
            raise EdgeqError(f"--episodes {text!r}: expected 'auto' or a positive integer such as 20") from None
        if n < 1:
            raise EdgeqError(f"--episodes must be >= 1 or 'auto', got {n}")
        return n
    return "auto"


def parse_seeds(text: str | None, episodes: int | str, seed: int, max_episodes: int = 200) -> list[int]:
    """``--seeds "0-9,20,31"`` (ranges inclusive) or, without it, ``seed .. seed+episodes-1``.

    With ``episodes="auto"`` the seeds available to the sequential loop: ``seed .. seed+max_episodes-1``.
    """
    if not text:
        n = parse_episodes(episodes)
        if n == "auto":
            if max_episodes < 1:
                raise EdgeqError(f"--max-episodes must be >= 1, got {max_episodes}")
            return list(range(seed, seed + max_episodes))
        return list(range(seed, seed + int(n)))
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
        for col in ("target", "model (file)", "calls", "median us", "p99 us", "p99.9 us", "large batch us/call"):
            table.add_column(col, justify="right")
        for t, name, m in lat_rows:
            b, lb = m["batch1"], m.get("large_batch", {})
            file = validation["targets"][t].get(f"{name}_model")
            table.add_row(t, f"{name} ({file})" if file else name, str(b["calls"]), f"{b['median_us']:.1f}",
                          f"{b['p99_us']:.1f}",
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
    "Roll a bundle's float and int8 policies out on the same seeds on each target; the verdict is the exit code "
    "(0: PASS on every validated target, 1: FAIL on one, 3: INCONCLUSIVE (too few episodes to tell; never a pass), "
    "2: error such as a bad bundle or no target able to run).\n\n"
    "PASS needs the whole 95% interval of int8 - float inside the band (default: a loss of at most 1% of |float mean|) "
    "and int8's failure rate at most --fail-tol above float's (exact McNemar on the seeds where only one failed). "
    "--episodes auto (default) adds paired episodes in batches until PASS or FAIL, with a confidence sequence valid "
    "under repeated looks, up to --max-episodes or --time-budget.\n\n"
    "Measured: paired returns with a bootstrap 95% CI and the verdict; the noise floor (float re-rolled with 1e-6 "
    "action noise, --floor-draws draws, on the first 30 seeds); action error and trajectory divergence; the "
    "sensitivity curve (float "
    "return under growing action noise, 6 levels x --sensitivity-draws extra rollouts: the most expensive part, "
    "--no-sensitivity skips it); per-layer SQNR and the one-layer-at-a-time ranking (cheap, on visited states); "
    "batch-1 latency over --latency-calls calls per model and target plus one large batch. --quick runs what "
    "'edgeq quantize' runs. Results go to validation.json, report.html and report.md in the bundle (or --out)."
)


@app.command(help=VALIDATE_HELP)
def validate(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory made by 'edgeq quantize'.")],
    episodes: Annotated[str, typer.Option(help="Paired episodes: 'auto' (batches until PASS or FAIL, at most "
                                               "--max-episodes) or a number N (seeds seed .. seed+N-1, one look).")
                        ] = "auto",
    max_episodes: Annotated[int, typer.Option(help="--episodes auto: at most this many paired episodes per target "
                                                   "(then INCONCLUSIVE).")] = 200,
    min_episodes: Annotated[int, typer.Option(help="--episodes auto: episodes before the first decision.")] = 30,
    time_budget: Annotated[float | None, typer.Option(help="--episodes auto: stop adding batches after this many "
                                                           "seconds of rollouts per target (then INCONCLUSIVE).")
                           ] = None,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    seeds: Annotated[str | None, typer.Option(help="Explicit seeds, e.g. '0-9,20': exactly these, one look "
                                                   "(overrides --episodes/--seed).")] = None,
    targets: Annotated[str, typer.Option(help="Comma-separated targets among cpu,cuda,trt; unavailable ones are "
                                              "reported and skipped.")] = "cpu,cuda,trt",
    rel_tol: Annotated[float, typer.Option(help="The band: int8 may lose at most rel_tol x |float mean| of return "
                                                "(the whole 95% interval of int8 - float must lie inside).")
                       ] = 0.01,
    abs_tol: Annotated[float | None, typer.Option(help="The band in return units instead of --rel-tol.")] = None,
    one_sided: Annotated[bool, typer.Option("--one-sided/--two-sided", help="One-sided (default): only a loss "
                                            "counts; two-sided: a gain beyond the band fails too.")] = True,
    fail_tol: Annotated[float, typer.Option(help="int8's failure rate may exceed float's by at most this (0.02 = 2 "
                                                 "percentage points).")] = 0.02,
    failure: Annotated[str | None, typer.Option(help="Which episode ends are failures: 'terminated' (a termination, "
                                                     "not a time-out), 'none', or a predicate on the last step such "
                                                     "as 'reward<=-100' or 'info.fell'. Default: the rule the bundle "
                                                     "was validated with, else 'terminated'.")] = None,
    ci_pass: Annotated[bool | None, typer.Option("--ci-pass/--no-ci-pass", hidden=True,
                                                 help="Removed: a CI that contains 0 is not a pass.")] = None,
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
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines; print only the verdict and "
                                                         "where the results are.")] = False,
) -> None:
    """Validate a bundle in closed loop (help text: :data:`VALIDATE_HELP`)."""
    from edgeq.validate.sequential import episode_design, fixed_design
    from edgeq.validate.targets import parse_targets
    from edgeq.validate.validator import ValidationOptions, save_validation, validate_bundle
    from edgeq.validate.verdict import Tolerance

    if ci_pass is not None:
        if ci_pass:
            err_console.print("[bold red]error:[/] --ci-pass was removed: a 95% interval that contains 0 is not "
                              "evidence that int8 keeps the return (with few episodes it always contains 0). "
                              "PASS now needs the whole interval inside the band (--rel-tol / --abs-tol); drop "
                              "the flag", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        err_console.print("[yellow]deprecated:[/] --no-ci-pass has no effect and will be removed: a CI containing 0 "
                          "never passes now", highlight=False, soft_wrap=True)

    from edgeq.deploy.contracts import Manifest, ValidationResult

    def go() -> tuple[ValidationResult, Manifest]:
        design = (fixed_design() if seeds else
                  episode_design(parse_episodes(episodes), max_episodes=max_episodes, time_budget=time_budget,
                                 min_episodes=min_episodes))
        seed_list = parse_seeds(seeds, episodes, seed, max_episodes)
        tol = Tolerance(relative=rel_tol, absolute=abs_tol, one_sided=one_sided, fail_tol=fail_tol)
        base = ValidationOptions.light() if quick else ValidationOptions(
            floor_draws=floor_draws, sensitivity=sensitivity, sensitivity_draws=sensitivity_draws,
            per_layer=per_layer, latency_calls=latency_calls, latency_large_batch=large_batch)
        from dataclasses import replace

        opts = replace(base, targets=tuple(parse_targets(targets)), tolerance=tol, num_envs=num_envs, design=design,
                       executor=executor_config(executor, workers, ray_address))
        from edgeq.export.bundle import check_output_dir

        # before the rollouts: a read-only bundle (or --out) is found now, not after minutes of work
        check_output_dir(out if out is not None else bundle, "--out" if out is not None else "BUNDLE")
        with progress_reporter(err_console, quiet=quiet or json_out) as prog:
            val, manifest = validate_bundle(bundle, seeds=seed_list, options=opts, progress=prog, failure=failure)
            prog("writing report", None)
            dest = out if out is not None else bundle
            save_validation(dest, val, manifest, report=report, update_manifest=out is None)
        return val, manifest

    val, manifest = run_guarded(go)
    if json_out:
        console.print_json(json.dumps(val))
    elif quiet:
        print_quiet(val, (out if out is not None else bundle) / "report.html" if report else None, label="report")
    else:
        print_summary(val, manifest)
        print_details(val)
        where = out if out is not None else bundle
        if report:
            console.print(f"report: {where / 'report.html'}", highlight=False, markup=False)
    raise typer.Exit(int(val["verdict"]["exit_code"]))
